"""The files that carry a run from one stage to the next, with their one reader and one writer.

Stages never share Python objects: ``train`` writes a run directory, ``export`` reads it and writes
an adapter directory, ``serve`` reads adapter directories. Everything they say to each other beyond
PEFT's own format goes through this module, so a format change happens in one place.

Run directory (written by ``train``)::

    RUN/adapter/adapter_config.json        PEFT LoRA at rank r0 (pruned components are exactly 0)
    RUN/adapter/adapter_model.safetensors
    RUN/masks.safetensors                  one bool vector (r0,) per module: True = component alive
    RUN/rank_history.json                  one record per pruning event
    RUN/prunedlora_run.json                RunRecord: base model, method config, final ranks
    RUN/ranks.png                          heatmap of final ranks (layers x module types)

Adapter directory (written by ``export``)::

    OUT/adapter_config.json, OUT/adapter_model.safetensors   compact PEFT LoRA, scaling folded into B
    OUT/prunedlora_adapter.json                              AdapterRecord: ranks, sizes, provenance

Module names are the base model's own module paths (``model.layers.0.self_attn.q_proj``), the same
strings PEFT's ``rank_pattern`` keys are matched against.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prunedlora.errors import PrunedLoraError
from prunedlora.staging import staged_files, write_text_atomic

FORMAT_VERSION = 1
RUN_ADAPTER_DIR = "adapter"
MASKS_FILE = "masks.safetensors"
# a LoRAPrune run's pruner state and final base-model masks (written by prunedlora.loraprune, read by export
# to refuse such a run: its adapter fits only the pruned base)
LORAPRUNE_STATE_FILE = "loraprune.pt"
RANK_HISTORY_FILE = "rank_history.json"
RUN_RECORD_FILE = "prunedlora_run.json"
RANKS_PLOT_FILE = "ranks.png"
ADAPTER_RECORD_FILE = "prunedlora_adapter.json"


class MetadataError(PrunedLoraError, ValueError):
    """A run or adapter directory is missing a file or holds one that does not parse.

    A PrunedLoraError, so the CLI prints it as one line; still a ValueError for older callers."""


@dataclass
class RunRecord:
    """What ``train`` tells ``export`` about a finished (or checkpointed) run."""

    base_model: str
    r0: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    ranks: dict[str, int]
    method: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    global_step: int = 0
    format_version: int = FORMAT_VERSION

    @property
    def average_rank(self) -> float:
        return sum(self.ranks.values()) / max(len(self.ranks), 1)


@dataclass
class AdapterRecord:
    """What ``export`` tells ``inspect`` and ``serve`` about a compact adapter."""

    base_model: str
    r0: int
    ranks: dict[str, int]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    source: str = "prunedlora"
    dropped_modules: list[str] = field(default_factory=list)
    pad_to: int | None = None
    svd_truncated: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON beside ``path`` and rename it into place: a reader never sees half a file, and a full
    disk or an unwritable folder is one line naming the path (``staging``)."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise MetadataError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MetadataError(f"{path} is not valid JSON: {err}") from err


def _from_dict(cls, payload: dict[str, Any], path: Path):
    from prunedlora.fieldtypes import check_field_types

    if not isinstance(payload, dict):
        raise MetadataError(f"{path} holds a JSON {type(payload).__name__}, not an object; the file is damaged")
    known = set(cls.__dataclass_fields__)
    try:
        record = cls(**{k: v for k, v in payload.items() if k in known})
    except TypeError as err:
        raise MetadataError(f"{path} lacks a required field: {err}") from err
    try:  # a field of the wrong type would fail far from the file that holds it
        check_field_types(record, MetadataError)
    except MetadataError as err:
        raise MetadataError(f"{path}: {err}; the file is damaged") from None
    return record


def write_run(
    run_dir: str | os.PathLike,
    record: RunRecord,
    masks: dict[str, torch.Tensor],
    save_adapter: Callable[[Path], Any],
    history: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a run directory: ``save_adapter(RUN/adapter)`` (PEFT's save_pretrained, pruned components
    zero), the masks, the rank history when given, and the run record last, so a record on disk means
    the files before it are complete. The one writer that ``train``, the benches' synthetic runs and
    the tests share."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(run_dir / RUN_ADAPTER_DIR)
    save_masks(run_dir / MASKS_FILE, masks)
    if history is not None:
        write_rank_history(run_dir / RANK_HISTORY_FILE, history)
    write_run_record(run_dir, record)
    return run_dir


def write_run_record(run_dir: str | os.PathLike, record: RunRecord) -> Path:
    path = Path(run_dir) / RUN_RECORD_FILE
    write_json_atomic(path, asdict(record))
    return path


def read_run_record(run_dir: str | os.PathLike) -> RunRecord:
    path = Path(run_dir) / RUN_RECORD_FILE
    return _from_dict(RunRecord, _read_json(path), path)


def write_adapter_record(adapter_dir: str | os.PathLike, record: AdapterRecord) -> Path:
    path = Path(adapter_dir) / ADAPTER_RECORD_FILE
    write_json_atomic(path, asdict(record))
    return path


def read_adapter_record(adapter_dir: str | os.PathLike) -> AdapterRecord | None:
    """The record of an adapter made by ``export``; None for a plain PEFT adapter."""
    path = Path(adapter_dir) / ADAPTER_RECORD_FILE
    if not path.exists():
        return None
    return _from_dict(AdapterRecord, _read_json(path), path)


def save_masks(path: str | os.PathLike, masks: dict[str, torch.Tensor]) -> None:
    tensors = {name: mask.detach().to("cpu", torch.bool).contiguous() for name, mask in masks.items()}
    with staged_files(path) as (tmp,):
        save_file(tensors, str(tmp), metadata={"format": "prunedlora-masks", "version": str(FORMAT_VERSION)})


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise MetadataError(f"{path} is missing")
    try:
        masks = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a damaged file
        raise MetadataError(f"{path} is not a readable safetensors file: {err}") from err
    bad = [name for name, mask in masks.items() if mask.dim() != 1]
    if bad:
        raise MetadataError(f"{path}: masks must be 1-D vectors, these are not: {bad[:5]}")
    return {name: mask.to(torch.bool) for name, mask in masks.items()}


def write_rank_history(path: str | os.PathLike, events: list[dict[str, Any]]) -> None:
    write_json_atomic(Path(path), events)


def read_rank_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    return _read_json(Path(path))
