"""Run by torchrun in tests/train/test_distributed.py: one rank of a 2-process PrunedLoRA run."""

import os
import sys

import torch


def main(model_dir: str, run_dir: str, dump_dir: str, mode: str = "full") -> None:
    """``full``: an uninterrupted run; ``crash``: checkpoints every 2 steps and is interrupted at step 5;
    ``resume``: the same command again, resuming from the crashed run's last checkpoint."""
    from prunedlora.rank.pruner import find_lora_modules
    from prunedlora.train.recipe import recipe_from_dict
    from prunedlora.train.runner import train

    recipe = recipe_from_dict(
        {
            "model": model_dir,
            "data": {"task": "sst2", "max_examples": 64, "max_length": 64},
            "method": {
                "r0": 8,
                "lora_alpha": 16,
                "target_rank": 3,
                "target_modules": ["q_proj", "v_proj", "up_proj"],
                "prune_start_step": 1,
                "prune_end_step": 5,
                "prune_every": 2,
                "criterion": "activation",
            },
            "training": {
                "output_dir": run_dir,
                "max_steps": 7,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2,
                "learning_rate": 5e-3,
                "save_steps": 100 if mode == "full" else 2,
            },
        }
    )
    captured = {}

    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            captured["begin_step"] = state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            if mode == "crash" and state.global_step == 5:
                raise KeyboardInterrupt("simulated interruption")

        def on_train_end(self, args, state, control, model=None, **kwargs):
            for name, module in find_lora_modules(model).items():
                captured[f"{name}.A"] = module.lora_a.detach().clone()
                captured[f"{name}.B"] = module.lora_b.detach().clone()

    result = train(recipe, resume=mode == "resume", callbacks=[Capture()])
    rank = int(os.environ["RANK"])
    begin = captured.pop("begin_step")
    torch.save(
        {"ranks": result.ranks, "weights": captured, "world": int(os.environ["WORLD_SIZE"]), "begin_step": begin},
        os.path.join(dump_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
