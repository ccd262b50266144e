"""Fake training runs, written exactly as the train stage writes them, for the export tests.

A fake run is ``get_peft_model(base, LoraConfig(...))`` with random factors (B nonzero, so every
module changes the logits), the pruned components zeroed, saved with ``save_pretrained``, plus the
masks and the run record via ``prunedlora.metadata``. Only training itself is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prunedlora import metadata
from prunedlora.rank.config import PrunedLoraConfig

# A masks spec: "random" (mixed patterns, including a module that keeps everything and one pruned to
# zero), "full" (nothing pruned), {module: bool mask}, or fn(module_name, index, r0, generator) -> mask.
MasksSpec = str | dict | Callable[[str, int, int, torch.Generator], torch.Tensor]


def _random_mask(index: int, r0: int, generator: torch.Generator) -> torch.Tensor:
    if index == 0:
        return torch.ones(r0, dtype=torch.bool)  # nothing pruned
    if index == 1:
        return torch.zeros(r0, dtype=torch.bool)  # pruned to rank 0: dropped from the export
    return torch.rand(r0, generator=generator) < 0.5


def make_masks(names: list[str], r0: int, spec: MasksSpec, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed + 1)
    if spec == "full":
        return {n: torch.ones(r0, dtype=torch.bool) for n in names}
    if spec == "random":
        return {n: _random_mask(i, r0, generator) for i, n in enumerate(names)}
    if isinstance(spec, dict):
        return {n: torch.as_tensor(spec[n], dtype=torch.bool) for n in names}
    return {n: torch.as_tensor(spec(n, i, r0, generator), dtype=torch.bool) for i, n in enumerate(names)}


def make_fake_run(
    base_dir: Path,
    out_dir: Path,
    r0: int = 8,
    alpha: float = 16.0,
    use_rslora: bool = False,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    masks_spec: MasksSpec = "random",
    seed: int = 0,
    b_std: float = 0.05,
    base_model=None,
) -> Path:
    """A run directory as training leaves it; ``base_model`` reuses an already loaded base (it is not changed)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = base_model
    if base is None:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.name_or_path = str(base_dir)
    config = LoraConfig(
        r=r0, lora_alpha=alpha, use_rslora=use_rslora, target_modules=list(target_modules), lora_dropout=0.0
    )
    model = get_peft_model(base, config)
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }
    names = sorted(layers)
    masks = make_masks(names, r0, masks_spec, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            layer = layers[name]
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.copy_(torch.randn(A.shape, generator=generator) / math.sqrt(A.shape[1]))
            B.copy_(torch.randn(B.shape, generator=generator) * b_std)
            keep = masks[name]
            A[~keep] = 0.0
            B[:, ~keep] = 0.0
    method = PrunedLoraConfig(
        r0=r0,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=list(target_modules),
        target_rank=float(max(1, r0 // 2)),
    )
    record = metadata.RunRecord(
        base_model=str(base_dir),
        r0=r0,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=list(target_modules),
        ranks={n: int(m.sum()) for n, m in masks.items()},
        method=method.to_dict(),
        training={"fake": True, "seed": seed},
        global_step=100,
    )
    out_dir = metadata.write_run(out_dir, record, masks, model.save_pretrained)  # the writer `train` uses
    model.unload()  # give the caller's base model back without LoRA layers
    (out_dir / "checkpoint-50").mkdir(exist_ok=True)  # training may leave these; export ignores them
    return out_dir


@pytest.fixture(scope="session")
def tiny_base(tiny_model_path):
    """The tiny base model loaded once (fake runs attach LoRA to it and detach it again)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


@pytest.fixture
def fake_run(tmp_path, tiny_model_path, tiny_base):
    """make_fake_run on the tiny model, writing under this test's tmp_path."""
    counter = iter(range(1000))

    def make(**kwargs) -> Path:
        out = kwargs.pop("out_dir", tmp_path / f"run{next(counter)}")
        return make_fake_run(tiny_model_path, out, base_model=tiny_base, **kwargs)

    return make


PROMPT_IDS = (
    torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2, 77, 9000, 12]]),
    torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]]),
)


@torch.no_grad()
def peft_logits(base_path: Path, adapter_dir: Path, ids=PROMPT_IDS) -> list[torch.Tensor]:
    """Logits of ``adapter_dir`` loaded by PEFT on a fresh copy of the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return [model(input_ids=x).logits for x in ids]


@torch.no_grad()
def hf_logits(model_path: Path, ids=PROMPT_IDS) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return [model(input_ids=x).logits for x in ids]


def max_abs_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def leftovers(parent: Path) -> list[str]:
    """Hidden staging folders an export may have left next to its output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
