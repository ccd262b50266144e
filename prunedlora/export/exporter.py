"""``export_adapter``: a run (or a PEFT adapter) in, a compact verified PEFT adapter folder out.

The output is assembled in a hidden temporary folder next to OUT_DIR (``staging.staged_directory``)
and renamed into place only after every check passed, so an interrupted or failed export never leaves
a half-written adapter that PEFT or vLLM could pick up (vLLM 0.32's engine dies on one bad adapter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunedlora import metadata
from prunedlora.export.compact import ModuleFactors, pad_module, pattern_key, svd_truncate
from prunedlora.export.errors import ExportError
from prunedlora.export.source import SourceAdapter, load_source, refuse_dense_base_for_salr
from prunedlora.modelfacts import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    PEFT_PREFIX,
    base_linear_shapes,
    saved_dtype,
    unmatched_targets,
)
from prunedlora.staging import staged_directory
from prunedlora.vllm_compat import ALLOWED_MAX_LORA_RANKS

MERGED_DIR = "merged"
ONNX_DIR = "onnx"
_SOURCE_LABELS = {"run": "prunedlora", "lora": "peft-lora", "adalora": "peft-adalora"}


@dataclass
class ExportResult:
    """What an export wrote and what it measured."""

    out_dir: Path
    record: metadata.AdapterRecord
    max_logit_diff: float | None = None  # None when verification was skipped
    truncation_logit_diff: float | None = None  # how much --svd-truncate changed the logits
    merged_dir: Path | None = None
    onnx_dir: Path | None = None
    onnx_max_diff: float | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rec = self.record
        lines = [f"exported {len(rec.ranks)} module(s) to {self.out_dir} (max rank {rec.max_rank})"]
        if rec.dropped_modules:
            lines.append(f"dropped {len(rec.dropped_modules)} module(s) pruned to rank 0")
        for name, err in sorted(rec.svd_truncated.items()):
            lines.append(f"svd-truncated {name}: relative error {err:.3g}")
        if self.max_logit_diff is not None:
            lines.append(f"verified with PEFT: max |logit difference| {self.max_logit_diff:.3g}")
        if self.truncation_logit_diff is not None:
            lines.append(f"svd truncation changed the logits by up to {self.truncation_logit_diff:.3g}")
        if self.merged_dir is not None:
            lines.append(f"merged model: {self.merged_dir}")
        if self.onnx_dir is not None:
            lines.append(
                f"ONNX model: {self.onnx_dir} (onnxruntime vs transformers max |logit difference| {self.onnx_max_diff:.3g})"
            )
        lines.extend(self.notes)
        return "\n".join(lines)


def _check_out_dir(out_dir: Path, source: Path, overwrite: bool) -> None:
    out, src = out_dir.resolve(), source.resolve()
    if out == src or out in src.parents or src in out.parents:
        raise ExportError(f"OUT_DIR {out_dir} overlaps the input {source}; choose a separate folder")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not overwrite:
            raise ExportError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")


def _compact_all(
    source: SourceAdapter, max_rank: int | None, svd: bool, pad_to: int | None
) -> tuple[dict[str, ModuleFactors], list[str], dict[str, float], dict[str, ModuleFactors]]:
    compact: dict[str, ModuleFactors] = {}
    dropped = []
    for name, module in source.modules.items():
        factors = module.compact()
        if factors is None:
            dropped.append(name)
        else:
            compact[name] = factors
    if not compact:
        raise ExportError("every module has rank 0: there is nothing to export (PEFT and vLLM refuse an empty adapter)")
    truncated: dict[str, float] = {}
    replaced: dict[str, ModuleFactors] = {}
    if max_rank is not None:
        if max_rank < 1:
            raise ExportError(f"--max-rank must be at least 1, got {max_rank}")
        limit = max_rank if pad_to is None else (max_rank // pad_to) * pad_to
        if limit < 1:
            raise ExportError(f"--max-rank {max_rank} is below --pad-to {pad_to}: no padded rank fits")
        over = {n: f.rank for n, f in compact.items() if f.rank > limit}
        if over and not svd:
            listed = ", ".join(f"{n} ({r})" for n, r in sorted(over.items())[:5])
            raise ExportError(
                f"{len(over)} module(s) have a rank above --max-rank {max_rank}"
                f"{'' if pad_to is None else f' (with --pad-to {pad_to}: above {limit})'}: {listed}"
                f"{' ...' if len(over) > 5 else ''}; pass --svd-truncate to reduce them by SVD"
            )
        for name in over:
            compact[name], truncated[name] = svd_truncate(compact[name], limit)
            replaced[name] = compact[name]
    if pad_to is not None:
        compact = {n: pad_module(f, pad_to) for n, f in compact.items()}
    return compact, dropped, truncated, replaced


def _write_adapter(staging: Path, source: SourceAdapter, compact: dict[str, ModuleFactors], base_model: str) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {name: f.rank for name, f in compact.items()}
    top = max(ranks.values())
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=sorted(compact),
        rank_pattern={pattern_key(n): r for n, r in ranks.items()},
        alpha_pattern={pattern_key(n): r for n, r in ranks.items()},
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        task_type=source.config.get("task_type") or "CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )
    config.save_pretrained(str(staging))
    tensors: dict[str, torch.Tensor] = {}
    for name, factors in compact.items():
        tensors[f"{PEFT_PREFIX}{name}{LORA_A_SUFFIX}"] = factors.A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}{LORA_B_SUFFIX}"] = factors.B.contiguous()
    save_file(tensors, str(staging / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})


def export_adapter(
    run_or_adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    pad_to: int | None = None,
    max_rank: int | None = None,
    svd_truncate: bool = False,
    from_adalora: bool = False,
    verify: bool = True,
    overwrite: bool = False,
    merge: bool = False,
    onnx: bool = False,
    tolerance: float | None = None,
) -> ExportResult:
    """Compact a pruned run (or a PEFT LoRA/AdaLoRA adapter) into a dense PEFT adapter at ``out_dir``.

    Each module keeps only its live components with its scaling folded into B; modules left with
    none are dropped. ``max_rank`` refuses modules above it unless ``svd_truncate``; ``pad_to`` pads
    ranks with zero components. With ``verify`` (default) the written adapter is loaded by PEFT and
    its logits compared with the source model's; ``merge`` also writes ``out_dir/merged`` (the base
    with the adapter merged) and ``onnx`` exports that to ``out_dir/onnx`` checked by onnxruntime.
    Raises ExportError (a PrunedLoraError) with nothing written on any failure.
    """
    from prunedlora.export.verify import (
        VERIFY_TOLERANCE,
        check_base_shapes,
        load_base,
        resolve_base_model,
        verify_dtype,
        verify_export,
    )

    source_path = Path(run_or_adapter_dir)
    out_path = Path(out_dir)
    if svd_truncate and max_rank is None:
        raise ExportError("--svd-truncate needs --max-rank R: the rank to truncate to")
    if pad_to is not None and pad_to < 1:
        raise ExportError(f"--pad-to must be a positive integer, got {pad_to}")
    _check_out_dir(out_path, source_path, overwrite)
    source = load_source(source_path, from_adalora=from_adalora)
    base_label = base_model or source.base_model
    base_path = resolve_base_model(base_label, str(source_path))
    refuse_dense_base_for_salr(source, base_path)
    missing = unmatched_targets(source.config.get("target_modules"), base_linear_shapes(base_path))
    if missing:
        raise ExportError(
            f"target_modules {missing} in {source.adapter_dir / ADAPTER_CONFIG_FILE} match no module of base model "
            f"{base_path}; remove them, or pass the --base-model the adapter was trained on"
        )
    base_params = check_base_shapes(base_path, {n: (m.in_features, m.out_features) for n, m in source.modules.items()})
    compact, dropped, truncated, replaced = _compact_all(source, max_rank, svd_truncate, pad_to)

    with staged_directory(out_path) as staging:
        _write_adapter(staging, source, compact, str(base_path))
        record = metadata.AdapterRecord(
            base_model=str(base_path),
            r0=source.r0,
            ranks={n: f.rank for n, f in sorted(compact.items())},
            params_before=source.num_params,
            params_after=sum(f.num_params for f in compact.values()),
            bytes_before=source.bytes,
            bytes_after=(staging / ADAPTER_WEIGHTS_FILE).stat().st_size,
            source=_SOURCE_LABELS[source.kind],
            dropped_modules=sorted(dropped),
            pad_to=pad_to,
            svd_truncated=truncated,
            training=source.training,
        )
        metadata.write_adapter_record(staging, record)
        result = ExportResult(out_dir=out_path, record=record)
        top = record.max_rank
        if top > ALLOWED_MAX_LORA_RANKS[-1]:
            result.notes.append(
                f"note: max rank {top} is above vLLM's largest slot ({ALLOWED_MAX_LORA_RANKS[-1]}); "
                "use --max-rank with --svd-truncate to serve it with vLLM"
            )

        def save_merged(peft_model) -> None:
            from transformers import AutoTokenizer

            # merged in float64 after a float64 verification, saved in the dtype the base model declares
            merged = peft_model.merge_and_unload().to(saved_dtype(base_path))
            merged.save_pretrained(staging / MERGED_DIR)
            try:
                AutoTokenizer.from_pretrained(base_path).save_pretrained(staging / MERGED_DIR)
            except Exception:
                pass  # a base without a tokenizer gives a merged model without one
            result.merged_dir = out_path / MERGED_DIR

        want_merged = merge or onnx
        if verify:
            report = verify_export(
                base_path,
                source.adapter_dir,
                staging,
                replaced=replaced,
                tolerance=VERIFY_TOLERANCE if tolerance is None else tolerance,
                dtype=verify_dtype(base_params),
                after=save_merged if want_merged else None,
            )
            result.max_logit_diff = report.max_abs_diff
            result.truncation_logit_diff = report.truncation_diff
        elif want_merged:
            from peft import PeftModel

            save_merged(PeftModel.from_pretrained(load_base(base_path), str(staging)))
        if onnx:
            from prunedlora.export.onnx_export import export_onnx

            result.onnx_max_diff = export_onnx(staging / MERGED_DIR, staging / ONNX_DIR)
            result.onnx_dir = out_path / ONNX_DIR
    return result
