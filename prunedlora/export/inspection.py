"""``inspect_adapter``: a table of per-module ranks and sizes for an exported adapter, a plain PEFT
adapter or a training run, read from file headers only (no weights are loaded into memory).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from prunedlora import metadata
from prunedlora.export.errors import ExportError
from prunedlora.export.source import is_run_dir
from prunedlora.modelfacts import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_PREFIX, module_sort_key

_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<layer>\d+)\.(?P<rest>.+)$")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_[ABE])(?:\.weight)?$")


def _tensor_shapes(adapter_dir: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {lora_A: shape, lora_B: shape, ...}} from the safetensors header."""
    from safetensors import safe_open

    path = adapter_dir / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise ExportError(f"{path} is missing")
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                match = _KEY.match(key)
                if match is None:
                    continue
                name = match["module"].removeprefix(PEFT_PREFIX)
                modules.setdefault(name, {})[match["part"]] = tuple(handle.get_slice(key).get_shape())
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"{path} is not a readable safetensors file (truncated or damaged: {err})") from err
    return modules


def _params(parts: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in parts.values():
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def rank_grid(ranks: dict[str, int | str]) -> list[str]:
    """Ranks as a layers x module-types grid; modules outside numbered layers get a row each."""
    grid: dict[tuple[str, int], dict[str, str]] = {}
    others: dict[str, str] = {}
    columns: list[str] = []
    short = {}
    for name in ranks:
        match = _LAYER.match(name)
        if match:
            short[name] = match["rest"].rsplit(".", 1)[-1]
    ambiguous = {
        s for s in set(short.values()) if len({_LAYER.match(n)["rest"] for n, v in short.items() if v == s}) > 1
    }
    for name, rank in ranks.items():
        match = _LAYER.match(name)
        if not match:
            others[name] = str(rank)
            continue
        column = match["rest"] if short[name] in ambiguous else short[name]
        if column not in columns:
            columns.append(column)
        grid.setdefault((match["prefix"], int(match["layer"])), {})[column] = str(rank)
    # the column order of `prunedlora train`'s table and heatmap: as the modules run in a decoder layer
    # of their family (q, k, v, o, gate, up, down; Phi-3's qkv, o, gate_up, down), others after
    columns.sort(key=module_sort_key)
    lines = []
    if grid:
        width = max(len(c) for c in columns)
        header = "layer".ljust(6) + " ".join(c.rjust(width) for c in columns)
        lines.append(header)
        prefixes = {p for p, _ in grid}
        for prefix, layer in sorted(grid):
            label = str(layer) if len(prefixes) == 1 else f"{prefix}.{layer}"
            row = grid[(prefix, layer)]
            lines.append(label.ljust(6) + " ".join(row.get(c, "-").rjust(width) for c in columns))
    if others:
        width = max(len(n) for n in others)
        lines.extend(f"{n.ljust(width)}  {r}" for n, r in sorted(others.items()))
    return lines


def _summary(rows: list[tuple[str, str, str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r)) for r in rows
    ]


def _ratio(before: int, after: int) -> str:
    return f"{after:,} ({100.0 * after / before:.1f}%)" if before else f"{after:,}"


def _inspect_exported(adapter_dir: Path, record: metadata.AdapterRecord) -> str:
    ranks: dict[str, int | str] = dict(record.ranks)
    ranks.update(dict.fromkeys(record.dropped_modules, 0))
    ranks = dict(sorted(ranks.items()))
    avg_after = sum(record.ranks.values()) / max(len(ranks), 1)
    lines = [
        f"exported adapter {adapter_dir} (source: {record.source}; base model: {record.base_model})",
        f"ranks per module (r0 = {record.r0}; 0 = dropped){'' if not record.pad_to else f'; padded to multiples of {record.pad_to}'}:",
        *rank_grid(ranks),
        "",
        *_summary(
            [
                ("", "before", "after"),
                ("modules", f"{len(ranks)}", f"{len(record.ranks)}"),
                ("rank (max / mean)", f"{record.r0} / {record.r0}", f"{record.max_rank} / {avg_after:.2f}"),
                ("parameters", f"{record.params_before:,}", _ratio(record.params_before, record.params_after)),
                ("bytes", f"{record.bytes_before:,}", _ratio(record.bytes_before, record.bytes_after)),
                ("size", _human_bytes(record.bytes_before), _human_bytes(record.bytes_after)),
            ]
        ),
    ]
    if record.dropped_modules:
        lines.append(f"dropped (rank 0): {len(record.dropped_modules)} module(s)")
    for name, err in sorted(record.svd_truncated.items()):
        lines.append(f"svd-truncated {name}: relative error {err:.3g}")
    return "\n".join(lines)


def _inspect_peft(adapter_dir: Path) -> str:
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(
            f"{adapter_dir / ADAPTER_CONFIG_FILE} is not valid JSON ({err}); the adapter folder is damaged"
        ) from None
    if not isinstance(config, dict):
        raise ExportError(
            f"{adapter_dir / ADAPTER_CONFIG_FILE} holds a JSON {type(config).__name__}, not an object; "
            "the adapter folder is damaged"
        )
    shapes = _tensor_shapes(adapter_dir)
    ranks = {n: parts["lora_A"][0] for n, parts in sorted(shapes.items()) if "lora_A" in parts}
    params = sum(_params(p) for p in shapes.values())
    size = (adapter_dir / ADAPTER_WEIGHTS_FILE).stat().st_size
    values = list(ranks.values()) or [0]
    lines = [
        f"PEFT {config.get('peft_type', '?')} adapter {adapter_dir} (base model: {config.get('base_model_name_or_path')})",
        f"r = {config.get('r')}, lora_alpha = {config.get('lora_alpha')}, use_rslora = {config.get('use_rslora', False)}"
        f", rank_pattern: {len(config.get('rank_pattern') or {})} key(s); ranks per module:",
        *rank_grid(ranks),
        "",
        *_summary(
            [
                ("", "", "this adapter"),
                ("modules", "", f"{len(ranks)}"),
                ("rank (max / mean)", "", f"{max(values)} / {sum(values) / len(values):.2f}"),
                ("parameters", "", f"{params:,}"),
                ("bytes", "", f"{size:,}"),
                ("size", "", _human_bytes(size)),
            ]
        ),
        "not compacted by prunedlora: `prunedlora export` writes the compact form",
    ]
    return "\n".join(lines)


def _inspect_run(run_dir: Path) -> str:
    try:
        record = metadata.read_run_record(run_dir)
        masks = metadata.load_masks(run_dir / metadata.MASKS_FILE)
    except metadata.MetadataError as err:
        raise ExportError(f"incomplete or damaged run directory: {err}") from err
    adapter_dir = run_dir / metadata.RUN_ADAPTER_DIR
    shapes = _tensor_shapes(adapter_dir)
    adapter_ranks = {n: parts["lora_A"][0] for n, parts in shapes.items() if "lora_A" in parts}
    wrong = sorted(set(masks) ^ set(adapter_ranks)) or [n for n in masks if masks[n].numel() != adapter_ranks[n]]
    if wrong:  # the same refusal as export's: numbers read from another run's masks would be wrong
        raise ExportError(
            f"{run_dir / metadata.MASKS_FILE} does not match the adapter in {adapter_dir} (e.g. module {wrong[0]}: "
            "names or lengths differ); use the masks saved by the same run"
        )
    ranks = {n: int(m.sum()) for n, m in sorted(masks.items())}
    before = sum(_params(p) for p in shapes.values())
    after = 0
    for name, parts in shapes.items():
        if name in ranks and "lora_A" in parts and "lora_B" in parts:
            after += ranks[name] * (parts["lora_A"][1] + parts["lora_B"][0])
    size = (adapter_dir / ADAPTER_WEIGHTS_FILE).stat().st_size
    kept = [r for r in ranks.values() if r > 0]
    lines = [
        f"training run {run_dir} (base model: {record.base_model}; step {record.global_step})",
        f"kept components per module (r0 = {record.r0}):",
        *rank_grid(ranks),
        "",
        *_summary(
            [
                ("", "now (rank r0)", "after export"),
                ("modules", f"{len(ranks)}", f"{len(kept)}"),
                (
                    "rank (max / mean)",
                    f"{record.r0} / {record.r0}",
                    f"{max(kept, default=0)} / {record.average_rank:.2f}",
                ),
                ("parameters", f"{before:,}", _ratio(before, after)),
                ("bytes", f"{size:,}", f"~{_human_bytes(size * after / before) if before else '0 B'}"),
            ]
        ),
    ]
    return "\n".join(lines)


def inspect_adapter(path: str | os.PathLike) -> str:
    """A printable table for an exported adapter, a plain PEFT adapter folder or a training run."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    try:
        record = metadata.read_adapter_record(path)
    except metadata.MetadataError as err:
        raise ExportError(str(err)) from err
    if record is not None:
        return _inspect_exported(path, record)
    if (path / ADAPTER_CONFIG_FILE).is_file():
        return _inspect_peft(path)
    if is_run_dir(path):
        return _inspect_run(path)
    raise ExportError(
        f"{path} is not an adapter folder ({ADAPTER_CONFIG_FILE}) nor a training run ({metadata.RUN_RECORD_FILE})"
    )
