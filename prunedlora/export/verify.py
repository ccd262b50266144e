"""Checking an export against the model it came from, with the loaders users will use (PEFT).

The reference is the input adapter loaded by PEFT on the base model (for a run, that is exactly the
masked training model: pruned components are zero there). The candidate is the written folder
loaded by PEFT the same way. Comparing logits of the two on a few prompts checks everything at once:
tensor names, per-module ranks, the rank/alpha pattern keys and the folded scaling.

Both sides run in float64 when the base model is small enough (``FLOAT64_MAX_PARAMS``): in float32
the summation-order noise alone reaches half the 1e-4 tolerance on SmolLM2 with LoRA on all 210
linear layers, so a correct export could fail by chance; in float64 that noise is gone and any
real mistake (a wrong key, rank or scaling) still moves the logits by far more than 1e-4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from prunedlora.export.compact import ModuleFactors
from prunedlora.export.errors import ExportError

VERIFY_PROMPTS: tuple[str, ...] = (
    "Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell?\nAnswer:",
    "def fibonacci(n):\n    ",
    "The movie was a quiet, patient portrait of a family, and",
)
VERIFY_TOLERANCE = 1e-4
FLOAT64_MAX_PARAMS = 2_000_000_000  # 16 GB of float64 weights


@dataclass
class VerifyReport:
    max_abs_diff: float  # written adapter vs the intended model
    num_prompts: int
    truncation_diff: float | None = None  # intended model (after SVD truncation) vs the input adapter


def resolve_base_model(base_model: str | None, source_label: str) -> Path:
    """The base model folder: a local Hugging Face folder, or "default"; never a download."""
    from prunedlora.errors import PrunedLoraError
    from prunedlora.models import resolve_model

    if not base_model:
        raise ExportError(f"{source_label} does not name its base model; pass --base-model PATH")
    try:
        return resolve_model(base_model)
    except PrunedLoraError as err:
        raise ExportError(
            f"base model {base_model!r} of {source_label} cannot be used ({err}); pass --base-model PATH"
        ) from err


def check_base_shapes(base_path: Path, modules: dict[str, tuple[int, int]]) -> int:
    """Every adapter module must be a linear layer of the base with the adapter's (in, out) shape.

    The model is built on the meta device from its config, so this costs no weights and runs even
    when verification is off. Returns the base model's parameter count.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_path)
    except Exception as err:
        raise ExportError(f"{base_path}/config.json cannot be read as a model config: {err}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = dict(model.named_modules())
    wrong = []
    for name, (in_features, out_features) in modules.items():
        layer = layers.get(name)
        if not isinstance(layer, torch.nn.Linear):
            wrong.append(f"{name} (not a linear layer of this model)")
        elif (layer.in_features, layer.out_features) != (in_features, out_features):
            wrong.append(
                f"{name} (model {layer.in_features}->{layer.out_features}, adapter {in_features}->{out_features})"
            )
    if wrong:
        raise ExportError(
            f"base model {base_path} does not fit the adapter: {len(wrong)} module(s) differ, e.g. {wrong[:3]}; "
            "pass the --base-model the adapter was trained on"
        )
    return sum(p.numel() for p in model.parameters())


def verify_dtype(num_params: int) -> torch.dtype:
    return torch.float64 if num_params <= FLOAT64_MAX_PARAMS else torch.float32


def load_base(base_path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    model.eval()
    return model


def prompt_ids(base_path: Path, prompts: tuple[str, ...] = VERIFY_PROMPTS) -> list[torch.Tensor]:
    """Token ids of the check prompts; fixed ids when the base folder has no tokenizer."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_path)
        return [torch.tensor([tokenizer(p)["input_ids"]]) for p in prompts]
    except Exception:
        generator = torch.Generator().manual_seed(0)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(base_path).vocab_size
        return [torch.randint(0, vocab, (1, 24), generator=generator) for _ in prompts]


@torch.no_grad()
def logits_of(model, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=x).logits for x in ids]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


@torch.no_grad()
def _set_reference_factors(peft_model, name: str, factors: ModuleFactors) -> None:
    """Make the reference module compute ``factors`` (an SVD truncation) in its own format.

    The truncated rank is below the module's own rank, so the factors fit zero-padded; the
    module's scaling (and AdaLoRA's E and ranknum) are undone so PEFT's forward gives B @ A.
    """
    layer = peft_model.base_model.model.get_submodule(name)
    adapter = peft_model.active_adapter
    A_param, B_param = layer.lora_A[adapter], layer.lora_B[adapter]
    A_param = getattr(A_param, "weight", A_param)
    B_param = getattr(B_param, "weight", B_param)
    rank = factors.rank
    scale = layer.scaling[adapter]
    if hasattr(layer, "lora_E"):
        scale = scale / (float(layer.ranknum[adapter]) + 1e-5)
        layer.lora_E[adapter].zero_()
        layer.lora_E[adapter][:rank] = 1.0
    A_param.zero_()
    B_param.zero_()
    A_param[:rank] = factors.A.to(A_param.dtype)
    B_param[:, :rank] = (factors.B.double() / scale).to(B_param.dtype)


def verify_export(
    base_path: Path,
    reference_dir: Path,
    written_dir: Path,
    *,
    replaced: dict[str, ModuleFactors] | None = None,
    tolerance: float = VERIFY_TOLERANCE,
    dtype: torch.dtype = torch.float64,
    after: Callable | None = None,
) -> VerifyReport:
    """Compare PEFT's logits for the written adapter with the reference's; raise above ``tolerance``.

    ``replaced`` holds modules the export changed on purpose (SVD truncation): the reference gets
    the same change, and the size of the change itself is reported as ``truncation_diff``.
    ``after(model)`` runs on the written adapter's PEFT model once the check passed (merging).
    """
    from peft import PeftModel

    ids = prompt_ids(base_path)
    base = load_base(base_path, dtype)
    reference = PeftModel.from_pretrained(base, str(reference_dir))
    reference.eval()
    expected = logits_of(reference, ids)
    truncation_diff = None
    if replaced:
        for name, factors in replaced.items():
            _set_reference_factors(reference, name, factors)
        truncated = logits_of(reference, ids)
        truncation_diff = max_diff(expected, truncated)
        expected = truncated
    base = reference.unload()
    candidate = PeftModel.from_pretrained(base, str(written_dir))
    candidate.eval()
    diff = max_diff(expected, logits_of(candidate, ids))
    if not diff <= tolerance:
        raise ExportError(
            f"verification failed: the written adapter's logits differ from the source model's by {diff:.3g} "
            f"(tolerance {tolerance:g}); nothing was written"
        )
    if after is not None:
        after(candidate)
    return VerifyReport(max_abs_diff=diff, num_prompts=len(ids), truncation_diff=truncation_diff)
