"""Slice a masked model into a smaller standard model plus a sliced LoRA adapter, verified on write.

The masked KV groups lose their q/k/v rows and o_proj input columns, the masked channels their gate/up
rows and down_proj columns, in the base weights and in the LoRA factors that touch them (B rows of
q/k/v/gate/up, A columns of o/down). Every layer keeps the same number of KV groups and channels, so
``config.json`` describes the result with one ``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size`` and an explicit ``head_dim`` (no longer ``hidden_size / num_attention_heads``), and
Hugging Face and vLLM load it unchanged. The folder is written under a temporary name and renamed into
place only after the written base + adapter, loaded back in float64, give the masked training model's
logits; otherwise nothing is written.
"""

from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from prunedlora.loraprune.errors import LorapruneError, SliceVerificationError
from prunedlora.loraprune.groups import PROJECTION_PATH, ROW_MODULES, DecoderShape, check_gqa, decoder_shape
from prunedlora.loraprune.masks import GroupMasks
from prunedlora.staging import staged_directory

BASE_DIR = "base"
ADAPTER_DIR = "adapter"
PRUNE_FILE = "loraprune.json"
TOLERANCE = 1e-4
_PROJECTION = re.compile(rf"{PROJECTION_PATH}\.")  # a state-dict key under one of the projections


@dataclass(frozen=True)
class PrunedModel:
    """What ``write_pruned`` wrote: the folder, its two parts and the verified logit difference."""

    path: Path
    base: Path
    adapter: Path | None
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_abs_logit_diff: float


def _indices(masks: GroupMasks, shape: DecoderShape, layer: int, module: str) -> torch.Tensor:
    if module in ("q_proj", "o_proj"):
        return torch.tensor(shape.q_columns(masks.kept_groups(layer)), dtype=torch.long)
    if module in ("k_proj", "v_proj"):
        return torch.tensor(shape.kv_rows(masks.kept_groups(layer)), dtype=torch.long)
    return torch.tensor(masks.kept_channels(layer), dtype=torch.long)


def slice_tensor(key: str, tensor: torch.Tensor, masks: GroupMasks, shape: DecoderShape) -> torch.Tensor:
    """``tensor`` of state-dict entry ``key`` (a base weight or bias, or a LoRA factor) with the masked
    groups removed; entries outside the projections, A of row modules and B of column modules (their
    pruned dimension is the rank) come back unchanged."""
    match = _PROJECTION.search(key)
    if match is None:
        return tensor
    layer, module = int(match.group(1)), match.group(2)
    rows = module in ROW_MODULES
    if ".lora_A" in key:
        if rows:
            return tensor
        return tensor.index_select(1, _indices(masks, shape, layer, module)).contiguous()
    if ".lora_B" in key:
        if not rows:
            return tensor
        return tensor.index_select(0, _indices(masks, shape, layer, module)).contiguous()
    if ".lora_" in key:
        raise LorapruneError(f"cannot slice {key}: only plain LoRA A/B factors are supported (no DoRA or embeddings)")
    if key.endswith("bias"):
        return tensor.index_select(0, _indices(masks, shape, layer, module)).contiguous() if rows else tensor
    return tensor.index_select(0 if rows else 1, _indices(masks, shape, layer, module)).contiguous()


def pruned_config(config, masks: GroupMasks, shape: DecoderShape):
    """A copy of ``config`` with the kept widths, which must be the same in every layer."""
    widths = masks.uniform_widths()
    if widths is None:
        raise LorapruneError(
            "layers keep different numbers of KV groups or channels (exempt layers stay full), and a standard "
            "config has one width for all layers: train with exempt_layers: none to export"
        )
    groups, channels = widths
    check_gqa(groups * shape.heads_per_group, groups)
    new = copy.deepcopy(config)
    new.num_attention_heads = groups * shape.heads_per_group
    new.num_key_value_heads = groups
    new.intermediate_size = channels
    new.head_dim = shape.head_dim
    return new


def base_state(model) -> dict[str, torch.Tensor]:
    """The base model's own weights (PEFT's ``base_layer`` names folded back, LoRA entries left out)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {key.replace(".base_layer.", "."): value for key, value in inner.state_dict().items() if ".lora_" not in key}


@contextmanager
def _float64(model):
    """The model in float64 and eval mode for the block, then each parameter and buffer back in its dtype
    (float32 and bfloat16 round-trip through float64 exactly)."""
    dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    training = model.training
    model.to(torch.float64).eval()
    try:
        yield model
    finally:
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            t.data = t.data.to(dtypes[name])
        model.train(training)


def probe_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def write_pruned(
    model, masks: GroupMasks, out_dir, tokenizer=None, extra: dict | None = None, dtype: torch.dtype | None = None
) -> PrunedModel:
    """Write ``out_dir/base`` (the sliced Hugging Face model, ``save_pretrained``, in ``dtype``, by default
    the model's own) and, for a PEFT model, ``out_dir/adapter`` (the sliced adapter), plus
    ``loraprune.json`` (widths, kept indices, ``extra``).

    ``model`` is the masked training model (a PEFT model or a plain causal LM) with ``masks`` attached;
    refused with one line when it is not Llama-like or its layers keep different widths."""
    from transformers import AutoModelForCausalLM

    config = model.config
    shape = decoder_shape(config)
    if (
        tuple(masks.heads.shape) != (shape.num_layers, shape.num_kv_heads)
        or masks.channels.shape[1] != shape.intermediate
    ):
        raise LorapruneError("the masks were made for another model shape")
    new_config = pruned_config(config, masks, shape)
    is_peft = hasattr(model, "peft_config")
    inner = model.get_base_model() if is_peft else model
    dtype = dtype or inner.get_input_embeddings().weight.dtype
    ids = probe_ids(config.vocab_size)
    device = inner.get_input_embeddings().weight.device
    with torch.no_grad(), _float64(model):
        reference = model(input_ids=ids.to(device)).logits.detach().cpu()
    state = {k: slice_tensor(k, v.detach().cpu(), masks, shape) for k, v in base_state(model).items()}
    out_dir = Path(out_dir)
    with staged_directory(out_dir) as staging:
        small = AutoModelForCausalLM.from_config(new_config, dtype=dtype)
        small.load_state_dict(state, strict=True)
        small.save_pretrained(staging / BASE_DIR)
        del small
        if tokenizer is not None:
            tokenizer.save_pretrained(staging / BASE_DIR)
        adapter = None
        if is_peft:
            adapter = _write_adapter(model, masks, shape, staging / ADAPTER_DIR, out_dir / BASE_DIR)
        diff = _verify(staging, ids, reference, is_peft)
        record = {
            "num_attention_heads": new_config.num_attention_heads,
            "num_key_value_heads": new_config.num_key_value_heads,
            "intermediate_size": new_config.intermediate_size,
            "head_dim": shape.head_dim,
            "original": {
                "num_attention_heads": shape.num_heads,
                "num_key_value_heads": shape.num_kv_heads,
                "intermediate_size": shape.intermediate,
            },
            "kept_kv_groups": [masks.kept_groups(i) for i in range(shape.num_layers)],
            "kept_channels": [masks.kept_channels(i) for i in range(shape.num_layers)],
            "max_abs_logit_diff": diff,
            **(extra or {}),
        }
        (staging / PRUNE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return PrunedModel(
        out_dir,
        out_dir / BASE_DIR,
        out_dir / ADAPTER_DIR if adapter else None,
        new_config.num_attention_heads,
        new_config.num_key_value_heads,
        new_config.intermediate_size,
        diff,
    )


def _write_adapter(model, masks: GroupMasks, shape: DecoderShape, folder: Path, final_base: Path) -> Path:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from prunedlora.modelfacts import ADAPTER_WEIGHTS_FILE

    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
    peft_config = copy.deepcopy(model.peft_config[name])
    if getattr(peft_config, "use_dora", False):
        raise LorapruneError("DoRA adapters cannot be sliced (their magnitude vector is per output row of W0+BA)")
    peft_config.base_model_name_or_path = str(final_base)
    state = get_peft_model_state_dict(model, adapter_name=name)
    sliced = {k: slice_tensor(k, v.detach().cpu(), masks, shape).contiguous() for k, v in state.items()}
    folder.mkdir(parents=True)
    peft_config.save_pretrained(folder)
    save_file(sliced, folder / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    return folder


def _verify(staging: Path, ids: torch.Tensor, reference: torch.Tensor, is_peft: bool) -> float:
    """Load what was written (float64) and compare its logits with the masked model's; raise if apart."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(staging / BASE_DIR, dtype=torch.float64)
    if is_peft:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, staging / ADAPTER_DIR)
    loaded.eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    diff = float((logits - reference).abs().max())
    if not diff <= TOLERANCE:
        raise SliceVerificationError(
            f"the sliced model's logits differ from the masked training model's by {diff:.3g} (> {TOLERANCE}) in "
            "float64: nothing was written"
        )
    return diff
