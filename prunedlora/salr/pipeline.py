"""``sparsify``: a base model in; its compressed sparse store, the dense materialised base and the
initial SALR adapter out, in one folder that appears whole or not at all.

    OUT_DIR/compressed/   sparse store (values + bitmap per pruned weight, manifest) + config, tokenizer
    OUT_DIR/base/         the same weights dense with zeros: a plain Hugging Face folder for PEFT/vLLM
    OUT_DIR/adapter/      PEFT LoRA of rank residual_rank + task_rank: the residual's SVD first, then
                          PEFT-initialised task components (B = 0, so it starts at M*W0 + E_r)
    OUT_DIR/salr.json     the settings, the calibration text's name and hash, per-module zero counts and
                          residual errors, bytes

Every setting is checked before a weight is read; the folder is built beside OUT_DIR and renamed
into place after the adapter was checked against M*W0 + E_r, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from prunedlora.metadata import write_json_atomic
from prunedlora.modelfacts import ADAPTER_CONFIG_FILE, base_linear_shapes, resolve_targets
from prunedlora.salr.config import SparsifyConfig
from prunedlora.salr.errors import SalrError
from prunedlora.salr.mask import keep_mask
from prunedlora.salr.materialise import copy_side_files, materialise, read_model_tensors
from prunedlora.salr.residual import (
    ResidualFactors,
    fold_residual,
    lora_layers,
    residual_factors,
    whitened_residual_factors,
)
from prunedlora.salr.storage import StoreReport, save_store
from prunedlora.staging import staged_directory

STORE_DIR, BASE_DIR, ADAPTER_DIR, RECORD_FILE = "compressed", "base", "adapter", "salr.json"


@dataclass
class ModuleReport:
    numel: int
    zeros: int  # weights the mask removed
    residual_relative_error: float  # ||E - E_r|| / ||E|| (whitened fit: in the calibration output norm)

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel


@dataclass
class SparsifyResult:
    out_dir: Path
    config: SparsifyConfig
    store: StoreReport
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    dense_file_bytes: int = 0  # the materialised base's safetensors (zeros written out)
    max_fold_error: float = 0.0  # max |adapter delta - E_r| over all weights (the base is checked bit-exact)

    def summary(self) -> str:
        zero = sum(m.zeros for m in self.modules.values()) / sum(m.numel for m in self.modules.values())
        errors = [m.residual_relative_error for m in self.modules.values()]
        c = self.config
        return "\n".join(
            [
                f"sparsified {len(self.modules)} module(s) of {self.out_dir}: {zero:.1%} zeros "
                f"({c.pattern}, {c.mask}), adapter rank {c.residual_rank} residual + {c.task_rank} task",
                f"residual rank {c.residual_rank}: relative error ||E - E_r||/||E|| mean "
                f"{sum(errors) / len(errors):.3f}, max {max(errors):.3f}",
                self.store.summary(),
                f"materialised dense base: {self.dense_file_bytes:,} bytes "
                f"({self.dense_file_bytes / self.store.file_bytes:.2f}x the compressed store)",
                f"adapter checked: base + adapter = M*W0 + E_r to {self.max_fold_error:.2g}",
            ]
        )


def target_weights(shapes: dict[str, tuple[int, int]], targets: list[str]) -> list[str]:
    """The ``.weight`` names of the linear modules whose last path part is in ``targets``."""
    return sorted(f"{name}.weight" for name in shapes if name.rsplit(".", 1)[-1] in targets)


def _check_out_dir(out_dir: Path, model_dir: Path, overwrite: bool) -> None:
    out, src = out_dir.resolve(), model_dir.resolve()
    if out == src or out in src.parents or src in out.parents:
        raise SalrError(f"OUT_DIR {out_dir} overlaps the model {model_dir}; choose a separate folder")
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise SalrError(f"{out_dir} exists and is not an empty folder; pass --overwrite to replace it")


def _calibrate(
    model_dir: Path, names: list[str], config: SparsifyConfig, calibration
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weight name -> X^T X of its module's calibration inputs (whitened fit) or only ||X_j|| (Wanda),
    and where they came from (the text's file name and hash, the tokens seen) for the record: the mask
    and the fit depend on the text, so a folder must say which text made it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunedlora.salr.calibration import (
        calibration_batch,
        input_grams,
        input_norms,
        read_calibration_text,
        text_digest,
    )

    text = read_calibration_text(calibration)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = calibration_batch(tokenizer, text, config.calibration_samples, config.calibration_length)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    modules = [n.removesuffix(".weight") for n in names]
    gather = input_grams if config.residual_fit == "whitened" and config.residual_rank else input_norms
    source = {
        "text": "default (the vendored CodeAlpaca slice)" if calibration is None else Path(calibration).name,
        "sha256": text_digest(text),
        "tokens": batch.numel(),
    }
    return {f"{k}.weight": v for k, v in gather(model, modules, batch).items()}, source


def _build_adapter(base_dir: Path, adapter_dir: Path, final_base: Path, config: SparsifyConfig, factors) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        use_rslora=config.use_rslora,
        target_modules=list(config.target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    fold_residual(peft_model, factors)
    peft_model.save_pretrained(adapter_dir)
    # PEFT records the staged base folder; point the adapter at where the base will live
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    write_json_atomic(config_path, {**json.loads(config_path.read_text()), "base_model_name_or_path": str(final_base)})


@torch.no_grad()
def fold_error(base_dir: Path, adapter_dir: Path, sparse: dict[str, torch.Tensor], factors) -> float:
    """Load base + adapter with PEFT as a user would and compare each adapted weight with M*W0 + E_r."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    worst = 0.0
    for name, layer in lora_layers(model).items():
        weight = f"{name}.weight"
        base = layer.get_base_layer().weight
        if not torch.equal(base, sparse[weight]):
            raise SalrError(f"the materialised base's {weight} differs from the sparse weight")
        delta = layer.get_delta_weight("default").double()
        f = factors.get(name)
        expected = f.B.double() @ f.A.double() if f is not None and f.rank else torch.zeros_like(delta)
        worst = max(worst, float((delta - expected).abs().max()))
    return worst


def sparsify(
    model: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    config: SparsifyConfig | None = None,
    calibration: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> SparsifyResult:
    """Prune ``model``'s target projections, write OUT_DIR (see the module docstring) and report bytes."""
    from prunedlora.models import resolve_model

    config = config or SparsifyConfig()
    out_dir = Path(out_dir)
    model_dir = resolve_model(None if model is None else str(model))
    _check_out_dir(out_dir, model_dir, overwrite)
    config = replace(config, target_modules=resolve_targets(model_dir, config.target_modules))  # all-linear
    shapes = base_linear_shapes(model_dir)
    names = target_weights(shapes, config.target_modules)
    if not names:
        raise SalrError(f"{model_dir} has no linear module named {', '.join(config.target_modules)}")
    for name in names:
        if config.residual_rank > min(shapes[name.removesuffix(".weight")]):
            raise SalrError(f"residual_rank {config.residual_rank} exceeds the smaller side of {name}")

    seen, source = _calibrate(model_dir, names, config, calibration) if config.needs_calibration else ({}, None)
    whitened = config.residual_fit == "whitened" and config.residual_rank > 0
    tensors = read_model_tensors(model_dir)
    sparse: dict[str, torch.Tensor] = {}
    factors: dict[str, ResidualFactors] = {}
    modules: dict[str, ModuleReport] = {}
    for name in names:
        weight = tensors[name]
        norm = None
        if config.mask == "wanda":  # ||X_j||: the Gram matrix's diagonal when the whitened fit gathered it
            norm = seen[name].diagonal().clamp_min(0).sqrt().float() if whitened else seen[name]
        keep = keep_mask(weight, config.sparsity, config.pattern, norm)
        zero = torch.zeros((), dtype=weight.dtype)
        sparse[name] = torch.where(keep, weight, zero)  # +0.0 where pruned, never -0.0
        removed = torch.where(keep, zero, weight)
        if whitened:
            f = whitened_residual_factors(removed, seen[name], config.residual_rank)
        else:
            f = residual_factors(removed, config.residual_rank)
        module = name.removesuffix(".weight")
        if config.residual_rank:
            factors[module] = f
        modules[module] = ModuleReport(
            numel=weight.numel(), zeros=int((~keep).sum()), residual_relative_error=f.relative_error
        )

    final = out_dir.resolve()
    with staged_directory(out_dir) as stage:
        store = save_store({**tensors, **sparse}, names, stage / STORE_DIR)
        copy_side_files(model_dir, stage / STORE_DIR)
        materialise(stage / STORE_DIR, stage / BASE_DIR)
        _build_adapter(stage / BASE_DIR, stage / ADAPTER_DIR, final / BASE_DIR, config, factors)
        worst = fold_error(stage / BASE_DIR, stage / ADAPTER_DIR, sparse, factors)
        scale = max(float(w.abs().max()) for w in sparse.values())
        if worst > 1e-4 * max(scale, 1.0):
            raise SalrError(f"the written adapter misses M*W0 + E_r by {worst:.3g}; nothing was written")
        result = SparsifyResult(
            out_dir=out_dir,
            config=config,
            store=store,
            modules=modules,
            dense_file_bytes=sum(p.stat().st_size for p in (stage / BASE_DIR).glob("*.safetensors")),
            max_fold_error=worst,
        )
        write_json_atomic(
            stage / RECORD_FILE,
            {
                "method": "salr",
                "source_model": str(model_dir),
                "config": config.to_dict(),
                "calibration": source,
                "bytes": {
                    "compressed_file": store.file_bytes,
                    "dense": store.dense_bytes,
                    "sparse_weights_dense": store.sparse_dense_bytes,
                    "sparse_weights_stored": store.sparse_stored_bytes,
                    "materialised_base_file": result.dense_file_bytes,
                },
                "max_fold_error": worst,
                "modules": {
                    name: {"numel": m.numel, "zeros": m.zeros, "residual_relative_error": m.residual_relative_error}
                    for name, m in modules.items()
                },
            },
        )
    return result
