"""Pruning results pinned bit for bit: every criterion, every recovery, both allocations and both schedules.

The criteria became registered objects (``prunedlora.rank.criteria``) in a refactor that must not change
a single decision or weight; these fingerprints were written by the string-branch pruner before it and
hold the refactored one to it. Each case trains a tiny random PEFT model for a few steps through pruning
events (one thread, so the float reductions are the same on any machine) and hashes the masks, the LoRA
weights, the rank history and the saved checkpoint state (names and bytes, so old checkpoints resume).

A torch other than the one that wrote the fixture may round differently: the test then skips and says
how to rewrite the fixture (``PRUNEDLORA_WRITE_PINS=1``), which is only right when nothing else changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from tests.test_pruner import batches, tiny_peft

FIXTURE = Path(__file__).parent / "fixtures" / "pruning_pins.json"
CRITERIA = (
    "obs",
    "obs-paper",
    "obs-fisher",
    "obs-input",
    "sensitivity",
    "taylor",
    "taylor-ema",
    "activation",
    "magnitude",
)
SHAPE = dict(r0=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], target_rank=3.0, min_rank=1)
SCHEDULE = dict(prune_start_step=2, prune_end_step=6, prune_every=2)  # events at 2, 4, 6
CASES = {
    **{f"{c}/{r}": dict(criterion=c, recovery=r) for c in CRITERIA for r in ("none", "compensate", "newton")},
    "obs/default": dict(criterion="obs"),
    "taylor/uniform": dict(criterion="taylor", allocation="uniform", target_rank=4.0),
    "obs-fisher/constant": dict(criterion="obs-fisher", schedule="constant", components_per_event=2, target_rank=4.0),
    "activation/max_rank": dict(criterion="activation", max_rank=6, min_rank=2),
}


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def fingerprint(options: dict, tmp_path: Path) -> dict:
    from prunedlora.rank.config import PrunedLoraConfig
    from prunedlora.rank.pruner import RankPruner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_peft(seed=3)
        pruner = RankPruner(model, PrunedLoraConfig(**{**SHAPE, **SCHEDULE, **options}))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        data = iter(batches(16, seed=1))
        _train(model, pruner, optimizer, params, data, range(5))  # events at 2 and 4, statistics since
        pruner.save(tmp_path)
        saved = {}
        from safetensors.torch import load_file

        for key, value in sorted(load_file(str(tmp_path / "prunedlora_pruner.safetensors")).items()):
            saved[key] = _digest(value)
        record = json.loads((tmp_path / "prunedlora_pruner.json").read_text())
        _train(model, pruner, optimizer, params, data, range(5, 8))  # through the last event (6)
        return {
            "ranks": pruner.ranks(),
            "masks": _digest(*(m for _, m in sorted(pruner.masks.items()))),
            "weights": _digest(*(t for _, m in sorted(pruner.modules.items()) for t in (m.lora_a, m.lora_b))),
            "history": hashlib.sha256(json.dumps(pruner.history, sort_keys=True).encode()).hexdigest()[:20],
            "saved_tensors": saved,
            "saved_record": record,
        }
    finally:
        torch.set_num_threads(threads)


def _train(model, pruner, optimizer, params, data, steps) -> None:
    for step in steps:
        for _ in range(2):  # two micro-batches a step
            ids = next(data)
            (model(input_ids=ids, labels=ids).loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        pruner.before_optimizer_step(step, optimizer)
        optimizer.step()
        pruner.after_optimizer_step()
        optimizer.zero_grad()


def _pins() -> dict:
    return json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pruning_matches_the_pinned_result(case, tmp_path):
    got = fingerprint(CASES[case], tmp_path)
    pins = _pins()
    if os.environ.get("PRUNEDLORA_WRITE_PINS") == "1":
        pins.setdefault("cases", {})[case] = got
        pins["torch"] = torch.__version__
        FIXTURE.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        return
    if pins.get("torch") != torch.__version__:
        pytest.skip(f"pins written with torch {pins.get('torch')}, this is {torch.__version__}: rounding may differ")
    assert got == pins["cases"][case]


def test_every_case_is_pinned_and_the_cases_differ():
    """The fixture covers every case, and the cases are not all the same run (a pin that ignored the
    criterion would pass everything above)."""
    cases = _pins()["cases"]
    assert set(cases) == set(CASES)
    assert len({c["weights"] for c in cases.values()}) >= len(CRITERIA) * 2


LORAPRUNE_CRITERIA = ("lora", "lora-act", "grad", "magnitude", "random")


def loraprune_fingerprint(criterion: str) -> dict:
    """LoRAPrune's masks and importance after a few steps with ``criterion`` (its own criteria, pinned
    through the same refactor)."""
    from prunedlora.loraprune.config import LorapruneConfig
    from prunedlora.loraprune.pruner import LoraPruner
    from tests.loraprune.helpers import tiny_peft as tiny_lora_llama
    from tests.loraprune.helpers import train_steps

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_lora_llama(seed=2)
        pruner = LoraPruner(model, LorapruneConfig(criterion=criterion, sparsity=0.4, prune_every=2), total_steps=8)
        train_steps(model, pruner, 8)
        state = pruner.state_dict()
        return {
            "masks": _digest(state["masks"]["heads"], state["masks"]["channels"]),
            "importance": _digest(state["head_importance"], state["channel_importance"]),
            "steps_scored": state["steps_scored"],
        }
    finally:
        pruner.close()
        torch.set_num_threads(threads)


@pytest.mark.parametrize("criterion", LORAPRUNE_CRITERIA)
def test_loraprune_matches_the_pinned_result(criterion):
    got = loraprune_fingerprint(criterion)
    pins = _pins()
    if os.environ.get("PRUNEDLORA_WRITE_PINS") == "1":
        pins.setdefault("loraprune", {})[criterion] = got
        FIXTURE.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
        return
    if pins.get("torch") != torch.__version__:
        pytest.skip(f"pins written with torch {pins.get('torch')}, this is {torch.__version__}: rounding may differ")
    assert got == pins["loraprune"][criterion]
