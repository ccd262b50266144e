"""Run by torchrun in tests/train/test_loraprune.py: one rank of a 2-process LoRAPrune run; dumps the
masks this rank holds at the end and its LoRA weights."""

import os
import sys

import torch


def main(model_dir: str, run_dir: str, dump_dir: str, criterion: str) -> None:
    from transformers import TrainerCallback

    from prunedlora.train.recipe import recipe_from_dict
    from prunedlora.train.runner import train

    recipe = recipe_from_dict(
        {
            "model": model_dir,
            "prune": False,
            "data": {"task": "sst2", "max_examples": 64, "max_length": 48},
            "method": {"r0": 4, "lora_alpha": 8, "target_rank": 2},
            "loraprune": {"sparsity": 0.5, "prune_every": 2, "criterion": criterion},
            "training": {
                "output_dir": run_dir,
                "max_steps": 8,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2,
                "learning_rate": 5e-3,
                "save_steps": 100,
            },
        }
    )
    captured = {}

    class Capture(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            for module in model.modules():
                for hook in module._forward_pre_hooks.values():
                    if hasattr(hook, "masks"):  # the pruner's mask hook: every one shares the same masks
                        captured["masks"] = hook.masks.state_dict()
            captured["weights"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    train(recipe, resume=False, callbacks=[Capture()])
    torch.save(captured, os.path.join(dump_dir, f"rank{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:5])
