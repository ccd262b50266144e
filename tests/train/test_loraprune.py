"""LoRAPrune through the Trainer on a tiny model: a recipe with a loraprune section trains, checkpoints
and resumes the pruner, leaves its masks in the run directory, and `prunedlora prune-export` slices it."""

import json

import pytest
import torch
from transformers import TrainerCallback

from prunedlora.cli import main
from prunedlora.loraprune import export_pruned
from prunedlora.loraprune.pruner import STATE_FILE, read_state
from prunedlora.rank.config import ConfigError
from prunedlora.train.recipe import recipe_from_dict
from prunedlora.train.runner import train
from tests.train.test_runner import Crash


def loraprune_recipe(model_dir, run_dir, **loraprune):
    return recipe_from_dict(
        {
            "model": str(model_dir),
            "prune": False,
            "data": {"task": "sst2", "max_examples": 64, "max_length": 48},
            "method": {"r0": 4, "lora_alpha": 8, "target_rank": 2},
            "loraprune": {"sparsity": 0.5, "prune_every": 2, **loraprune},
            "training": {
                "output_dir": str(run_dir),
                "max_steps": 8,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "learning_rate": 5e-3,
                "save_steps": 4,
                "save_total_limit": None,
                "logging_steps": 1,
            },
        }
    )


@pytest.fixture(scope="module")
def pruned_run(tiny_model_path, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("loraprune") / "run"
    result = train(loraprune_recipe(tiny_model_path, run_dir))
    return run_dir, result


def test_training_leaves_final_masks_and_checkpointed_state(pruned_run):
    run_dir, result = pruned_run
    assert result.global_step == 8
    state = read_state(run_dir)
    heads, channels = state["masks"]["heads"], state["masks"]["channels"]
    # tiny model: 2 KV groups (2 query heads each), MLP 128; 50% -> one group and most of the channels
    assert heads.sum(1).tolist() == [1, 1]
    kept = channels.sum(1).tolist()
    assert kept[0] == kept[1] and 0 < kept[0] < 128
    assert (run_dir / "checkpoint-4" / STATE_FILE).is_file()
    early = read_state(run_dir / "checkpoint-4")["masks"]["channels"]
    assert not (channels & ~early).any()  # nothing pruned at step 4 came back by step 8


def test_prune_export_writes_a_smaller_verified_model(pruned_run, tmp_path, capsys):
    run_dir, _ = pruned_run
    out = tmp_path / "pruned"
    assert main(["prune-export", str(run_dir), str(out)]) == 0
    assert "query heads over 1 KV heads" in capsys.readouterr().out
    config = json.loads((out / "base" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    record = json.loads((out / "loraprune.json").read_text())
    assert record["max_abs_logit_diff"] <= 1e-4 and record["loraprune"]["sparsity"] == 0.5
    assert (out / "base" / "tokenizer_config.json").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    # a second export to the same folder is refused with one line; --overwrite replaces it
    capsys.readouterr()
    assert main(["prune-export", str(run_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunedlora prune-export: error: ") and err.count("\n") == 1 and "--overwrite" in err
    assert export_pruned(run_dir, out, overwrite=True).max_abs_logit_diff <= 1e-4


def test_a_run_without_loraprune_state_is_refused(tmp_path, capsys):
    assert main(["prune-export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "was not written by a LoRAPrune run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interrupted_run_resumes_to_the_same_masks(pruned_run, tiny_model_path, tmp_path):
    run_dir, _ = pruned_run
    resumed_dir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(loraprune_recipe(tiny_model_path, resumed_dir), callbacks=[Crash(at_step=5)])
    assert (resumed_dir / "checkpoint-4" / STATE_FILE).is_file()
    train(loraprune_recipe(tiny_model_path, resumed_dir))
    expected, got = read_state(run_dir)["masks"], read_state(resumed_dir)["masks"]
    assert torch.equal(expected["heads"], got["heads"]) and torch.equal(expected["channels"], got["channels"])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prune=True), "set prune: false"),
        (dict(loraprune={"sparsity": 1.0}), "loraprune: sparsity must lie strictly between 0 and 1"),
        (dict(loraprune={"sparsty": 0.2}), "unknown loraprune setting"),
        (dict(loraprune=[1]), "loraprune must be a mapping"),
    ],
)
def test_bad_loraprune_recipes_are_refused_with_one_line(tmp_path, change, message):
    raw = {"model": "default", "prune": False, "data": {"task": "sst2"}, "loraprune": {}, **change}
    with pytest.raises(ConfigError, match=message) as info:
        recipe_from_dict(raw)
    assert "\n" not in str(info.value)


class BaseWeightsWatch(TrainerCallback):
    """Snapshots the base projections at the start and compares them at the end."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}

    def on_train_end(self, args, state, control, **kwargs):
        after = {n: p.detach() for n, p in self.model.named_parameters() if "base_layer" in n}
        self.unchanged = all(torch.equal(self.before[n], after[n]) for n in self.before)
        self.frozen = not any(p.requires_grad for n, p in self.model.named_parameters() if "base_layer" in n)


def test_grad_criterion_through_the_trainer_never_updates_the_base(tiny_model_path, tmp_path):
    watch = BaseWeightsWatch()
    train(loraprune_recipe(tiny_model_path, tmp_path / "grad", criterion="grad"), callbacks=[watch])
    assert watch.unchanged and watch.frozen
    assert read_state(tmp_path / "grad")["masks"]["heads"].sum(1).tolist() == [1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["lora", "random"])
def test_two_processes_take_the_same_pruning_decisions(tiny_model_path, tmp_path, criterion):
    """torchrun, 2 CPU processes (gloo): the gradients the pruner scores are all-reduced and the random
    criterion is seeded, so both ranks mask the same groups and end with the same weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    dump = tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    worker = Path(__file__).with_name("loraprune_ddp_worker.py")
    port = str(29541 + ["lora", "random"].index(criterion))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    proc = subprocess.run(
        [*cmd, str(worker), str(tiny_model_path), str(tmp_path / "run"), str(dump), criterion],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["masks"]["heads"], rank1["masks"]["heads"])
    assert torch.equal(rank0["masks"]["channels"], rank1["masks"]["channels"])
    assert not rank0["masks"]["channels"].all()
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key
    saved = read_state(tmp_path / "run")["masks"]
    assert torch.equal(saved["channels"], rank0["masks"]["channels"])
