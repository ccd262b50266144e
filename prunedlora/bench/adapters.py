"""The adapters the latency bench serves: from real training runs, or synthetic ones of real shapes.

vLLM pads every adapter to the engine's ``max_lora_rank`` and computes with the padded slot, so an
adapter's serving cost depends on the slot it needs (its largest module rank) and on nothing about its
weight values. That is why synthetic adapters are a fair stand-in for latency: a synthetic run is
written exactly as ``train`` writes one (PEFT adapter at r0 with pruned components zero, masks, run
record) with the per-module ranks of a real pruned run, and goes through the real ``export``. Every
bench adapter is therefore an exported adapter, and the JSON says where its ranks came from.

Families: ``r0`` (every module at r0, the plain LoRA a user would otherwise train), ``pruned-global``
(PrunedLoRA's default allocation: ranks differ per module, the widest module sets the slot) and
``pruned-uniform`` (every module at the target rank, the tightest slot). ``mixed-rank``
(:func:`mixed_rank_adapters`) is one synthetic adapter per rank (every module at that rank, e.g. 4, 8
and 16), batched together in the slot of the largest: with vLLM's stock ops each pays the slot, with
the rank-aware ops (``serve.lora_ops``) each should pay its own rank.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from prunedlora import metadata
from prunedlora.errors import PrunedLoraError
from prunedlora.modelfacts import (
    ADAPTER_WEIGHTS_FILE,
    ALL_LINEAR,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    PEFT_PREFIX,
    base_linear_shapes,
    model_facts,
)
from prunedlora.staging import write_text_atomic

FAMILIES = ("r0", "pruned-global", "pruned-uniform")
MIXED_RANK_FAMILY = "mixed-rank"
# Per-module ranks of real PrunedLoRA runs on the default model, shipped so that the default latency
# bench needs no training (see rank_patterns.json for the commands that produced them).
BUNDLED_PATTERNS = Path(__file__).with_name("rank_patterns.json")
_SPEC_FILE = "bench_adapter_spec.json"


class BenchAdapterError(PrunedLoraError):
    """An adapter for the bench cannot be made from what was given."""


@dataclass
class BenchAdapter:
    """One exported adapter the bench serves."""

    name: str
    family: str
    path: Path
    ranks: dict[str, int]
    source: str  # where the ranks (and weights) came from, for the report

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())

    @property
    def average_rank(self) -> float:
        return sum(self.ranks.values()) / len(self.ranks)


@dataclass
class AdapterSet:
    """The bench adapters by family, each family a list (a mix of N adapters cycles through it)."""

    families: dict[str, list[BenchAdapter]] = field(default_factory=dict)
    synthetic: bool = True

    def describe(self) -> dict:
        """JSON-ready families (paths as results write them: from the repository or ``~``)."""
        from prunedlora.bench.report import portable_path

        return {
            family: [
                {
                    "name": a.name,
                    "path": portable_path(a.path),
                    "max_rank": a.max_rank,
                    "average_rank": round(a.average_rank, 3),
                    "source": a.source,
                }
                for a in adapters
            ]
            for family, adapters in self.families.items()
        }


# -- rank patterns ----------------------------------------------------------------------------------


def target_module_shapes(model_dir: str | os.PathLike, target_modules=ALL_LINEAR) -> dict[str, tuple[int, int]]:
    """Module name -> (out_features, in_features) of the base model's target linear layers, in order.

    Read from the safetensors headers (no weights loaded), as ``serve`` validates adapters;
    ``all-linear`` is every projection of the model's family (``modelfacts``).
    """
    if target_modules == ALL_LINEAR:
        target_modules = model_facts(model_dir).projections
    shapes = base_linear_shapes(model_dir)
    found = {name: shape for name, shape in shapes.items() if name.rsplit(".", 1)[-1] in set(target_modules)}
    if not found:
        raise BenchAdapterError(
            f"base model {model_dir} has no linear layer named {', '.join(target_modules)}; pass --target-modules"
        )
    return dict(sorted(found.items(), key=lambda item: _module_order(item[0])))


def _module_order(name: str) -> tuple:
    parts = name.split(".")
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def load_bundled_patterns(path: str | os.PathLike = BUNDLED_PATTERNS) -> list[dict]:
    """The shipped real-run rank patterns: a list of {task, allocation, r0, target_rank, ranks, command}."""
    path = Path(path)
    if not path.is_file():
        return []
    return json.loads(path.read_text())["patterns"]


def random_global_pattern(modules: list[str], r0: int, target: float, seed: int) -> dict[str, int]:
    """Heterogeneous ranks with the target average (a stand-in when no real run exists for a model).

    Only used for models without a bundled or given run (the tests' tiny models); the report marks it.
    """
    rng = random.Random(seed)
    total = round(target * len(modules))
    ranks = dict.fromkeys(modules, 1)
    left = total - len(modules)
    while left > 0:
        module = rng.choice(modules)
        if ranks[module] < r0:
            ranks[module] += 1
            left -= 1
    return ranks


# -- writing a run as `train` would --------------------------------------------------------------------


def write_synthetic_run(
    model_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    ranks: dict[str, int],
    *,
    r0: int,
    lora_alpha: float = 64.0,
    seed: int = 0,
    source: str = "synthetic",
) -> Path:
    """A run directory in ``train``'s format whose masks keep ``ranks[m]`` components of module m.

    Weights are random (A ~ N(0, 1/in), B ~ N(0, 0.01^2)); pruned components are exactly zero, as
    training leaves them, so ``export`` compacts it like a real run.
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    model_dir, run_dir = Path(model_dir), Path(run_dir)
    shapes = target_module_shapes(model_dir, sorted({m.rsplit(".", 1)[-1] for m in ranks}))
    missing = sorted(set(ranks) - set(shapes))
    if missing:
        raise BenchAdapterError(f"rank pattern names modules the base model {model_dir} lacks, e.g. {missing[:3]}")
    bad = {m: r for m, r in ranks.items() if not 0 <= r <= r0}
    if bad:
        raise BenchAdapterError(f"ranks must lie in [0, r0={r0}]; got {dict(list(bad.items())[:3])}")
    generator = torch.Generator().manual_seed(seed)
    targets = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    tensors, masks = {}, {}
    for name, rank in ranks.items():
        out_features, in_features = shapes[name]
        keep = torch.zeros(r0, dtype=torch.bool)
        keep[torch.randperm(r0, generator=generator)[:rank]] = True
        a = torch.randn(r0, in_features, generator=generator) / math.sqrt(in_features)
        b = torch.randn(out_features, r0, generator=generator) * 0.01
        a[~keep] = 0.0
        b[:, ~keep] = 0.0
        tensors[f"{PEFT_PREFIX}{name}{LORA_A_SUFFIX}"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}{LORA_B_SUFFIX}"] = b.contiguous()
        masks[name] = keep

    def save_adapter(adapter_dir: Path) -> None:
        LoraConfig(
            r=r0,
            lora_alpha=lora_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=str(model_dir),
        ).save_pretrained(str(adapter_dir))
        save_file(tensors, str(adapter_dir / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})

    record = metadata.RunRecord(
        base_model=str(model_dir),
        r0=r0,
        lora_alpha=lora_alpha,
        use_rslora=False,
        target_modules=targets,
        ranks=dict(ranks),
        method={"r0": r0, "lora_alpha": lora_alpha},
        training={"synthetic": True, "source": source, "seed": seed},
    )
    metadata.write_run(run_dir, record, masks, save_adapter)
    return run_dir


def _spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _export_cached(source: Path, out: Path, spec: dict) -> None:
    """Export ``source`` to ``out`` unless ``out`` already holds the export of this very spec."""
    from prunedlora.export.exporter import export_adapter

    marker = out / _SPEC_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("hash") == _spec_hash(spec):
        return
    export_adapter(source, out, verify=False, overwrite=True)
    write_text_atomic(marker, json.dumps({"hash": _spec_hash(spec), "spec": spec}, indent=2, sort_keys=True) + "\n")


def synthetic_adapters(
    model_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    r0: int = 32,
    target_rank: int = 8,
    lora_alpha: float = 64.0,
    target_modules=ALL_LINEAR,
    patterns: list[dict] | None = None,
    per_family: int | dict[str, int] = 3,
) -> AdapterSet:
    """Exported synthetic adapters of the families r0, pruned-global and pruned-uniform.

    ``per_family`` is how many of each (an int for all, or {family: count}; missing families get 1).

    pruned-global ranks come from ``patterns`` (real runs; the bundled ones by default) whose module
    names match this model, cycling through them; without one, from :func:`random_global_pattern`
    (marked as such). Adapters are cached in ``work_dir`` by their spec, so reruns reuse them.
    """
    model_dir, work_dir = Path(model_dir), Path(work_dir)
    shapes = target_module_shapes(model_dir, target_modules)
    modules = list(shapes)
    if patterns is None:
        patterns = load_bundled_patterns()
    usable = [
        p
        for p in patterns
        if set(p["ranks"]) == set(modules) and p.get("allocation", "global") == "global" and int(p.get("r0", r0)) == r0
    ]
    result = AdapterSet(synthetic=True)
    counts = per_family if isinstance(per_family, dict) else dict.fromkeys(FAMILIES, per_family)
    for family in FAMILIES:
        result.families[family] = []
        for i in range(max(1, int(counts.get(family, 1)))):
            if family == "r0":
                ranks, source = dict.fromkeys(modules, r0), f"synthetic, every module at r0={r0}"
            elif family == "pruned-uniform":
                ranks = {m: int(target_rank) for m in modules}
                source = f"synthetic, every module at rank {target_rank} (uniform allocation)"
            elif usable:
                pattern = usable[i % len(usable)]
                ranks = {m: int(pattern["ranks"][m]) for m in modules}
                source = f"synthetic weights, ranks of a real {pattern.get('task', '')} run ({pattern.get('source', 'bundled')})"
            else:
                ranks = random_global_pattern(modules, r0, target_rank, seed=i)
                source = f"synthetic, random heterogeneous ranks averaging {target_rank} (no real run for this model)"
            result.families[family].append(
                _synthetic_adapter(
                    model_dir,
                    work_dir,
                    f"{family}-{i}",
                    family,
                    ranks,
                    r0=r0,
                    lora_alpha=lora_alpha,
                    seed=i,
                    source=source,
                )
            )
    return result


def _synthetic_adapter(
    model_dir: Path,
    work_dir: Path,
    name: str,
    family: str,
    ranks: dict[str, int],
    *,
    r0: int,
    lora_alpha: float,
    seed: int,
    source: str,
) -> BenchAdapter:
    """A synthetic run with ``ranks`` written and exported to ``work_dir / name``, reused while the
    folder holds the export of the same spec."""
    spec = {
        "model": str(model_dir.resolve()),
        "ranks": ranks,
        "r0": r0,
        "alpha": lora_alpha,
        "seed": seed,
        "format": 1,
    }
    run_dir = work_dir / "runs" / name
    out = work_dir / name
    marker = out / _SPEC_FILE
    if not (marker.is_file() and json.loads(marker.read_text()).get("hash") == _spec_hash(spec)):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        write_synthetic_run(model_dir, run_dir, ranks, r0=r0, lora_alpha=lora_alpha, seed=seed, source=source)
        _export_cached(run_dir, out, spec)
        shutil.rmtree(run_dir, ignore_errors=True)  # the r0-sized run is only the export's input
    return BenchAdapter(name, family, out, _exported_ranks(out), source)


def mixed_rank_adapters(
    model_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    ranks=(4, 8, 16),
    *,
    r0: int = 32,
    lora_alpha: float = 64.0,
    target_modules=ALL_LINEAR,
) -> list[BenchAdapter]:
    """The ``mixed-rank`` family: one exported synthetic adapter per rank in ``ranks``, every module at
    that rank (named ``mixed-rank-r<rank>``), built and cached as :func:`synthetic_adapters` builds
    its own (a run in train's format with max(r0, rank) components, through the real export).

    The bench batches them together in the slot of the largest rank, to show what each one costs
    there: its own rank (rank-aware ops) or the slot (vLLM's stock ops).
    """
    model_dir, work_dir = Path(model_dir), Path(work_dir)
    ranks = [int(r) for r in ranks]
    if len(ranks) < 2 or len(set(ranks)) != len(ranks) or min(ranks) < 1:
        raise BenchAdapterError(f"mixed ranks must be at least two distinct positive ranks, got {ranks}")
    return [
        uniform_rank_adapter(
            model_dir,
            work_dir,
            rank,
            name=f"{MIXED_RANK_FAMILY}-r{rank}",
            family=MIXED_RANK_FAMILY,
            r0=r0,
            lora_alpha=lora_alpha,
            target_modules=target_modules,
            source=f"synthetic, every module at rank {rank} (mixed-rank batch)",
        )
        for rank in ranks
    ]


def uniform_rank_adapter(
    model_dir: str | os.PathLike,
    work_dir: str | os.PathLike,
    rank: int,
    *,
    name: str,
    family: str,
    r0: int = 32,
    lora_alpha: float = 64.0,
    target_modules=ALL_LINEAR,
    source: str | None = None,
) -> BenchAdapter:
    """One exported synthetic adapter with every target module at ``rank`` (built from a run of
    max(r0, rank) components through the real export; cached like :func:`synthetic_adapters`)."""
    if int(rank) < 1:
        raise BenchAdapterError(f"rank must be positive, got {rank}")
    model_dir, work_dir, rank = Path(model_dir), Path(work_dir), int(rank)
    modules = list(target_module_shapes(model_dir, target_modules))
    return _synthetic_adapter(
        model_dir,
        work_dir,
        name,
        family,
        dict.fromkeys(modules, rank),
        r0=max(r0, rank),
        lora_alpha=lora_alpha,
        seed=1000 + rank,
        source=source or f"synthetic, every module at rank {rank}",
    )


def adapters_from_runs(run_dirs: list[str | os.PathLike], work_dir: str | os.PathLike) -> AdapterSet:
    """Exported adapters of real training runs: each run's compact adapter in its allocation's family
    (pruned-global or pruned-uniform) and its uncompacted r0 adapter (zero components kept) in ``r0``.

    A plain-LoRA run (``prune: false``) only contributes to ``r0``. The r0 adapter has the pruned run's
    own weights padded with zero components: the same shapes, hence the same serving cost, as a plain
    LoRA at r0.
    """
    work_dir = Path(work_dir)
    result = AdapterSet(synthetic=False)
    for family in FAMILIES:
        result.families[family] = []
    for i, run in enumerate(run_dirs):
        run = Path(run)
        try:
            record = metadata.read_run_record(run)
        except metadata.MetadataError as err:
            raise BenchAdapterError(f"{run} is not a finished `prunedlora train` run: {err}") from err
        stamp = (run / metadata.RUN_ADAPTER_DIR / ADAPTER_WEIGHTS_FILE).stat().st_mtime_ns
        base = {"run": str(run.resolve()), "stamp": stamp, "format": 1}
        r0_out = work_dir / f"r0-{i}"
        _export_cached(run / metadata.RUN_ADAPTER_DIR, r0_out, {**base, "kind": "r0"})
        result.families["r0"].append(
            BenchAdapter(f"r0-{i}", "r0", r0_out, _exported_ranks(r0_out), f"run {run} (uncompacted)")
        )
        pruned = set(record.ranks.values()) != {record.r0}
        if pruned:
            family = "pruned-uniform" if record.method.get("allocation") == "uniform" else "pruned-global"
            out = work_dir / f"{family}-{i}"
            _export_cached(run, out, {**base, "kind": "pruned"})
            result.families[family].append(
                BenchAdapter(f"{family}-{i}", family, out, _exported_ranks(out), f"run {run}")
            )
    result.families = {k: v for k, v in result.families.items() if v}
    if not any(f.startswith("pruned") for f in result.families):
        raise BenchAdapterError("none of the runs is pruned (all ranks equal r0); pass at least one PrunedLoRA run")
    return result


def _exported_ranks(adapter_dir: Path) -> dict[str, int]:
    record = metadata.read_adapter_record(adapter_dir)
    if record is None:
        raise BenchAdapterError(f"{adapter_dir} has no {metadata.ADAPTER_RECORD_FILE}; it was not written by export")
    return dict(record.ranks)


def adapter_set_summary(adapters: AdapterSet) -> dict:
    """JSON-ready description (for the results file)."""
    return {"synthetic": adapters.synthetic, "families": adapters.describe()}


__all__ = [
    "AdapterSet",
    "BenchAdapter",
    "BenchAdapterError",
    "FAMILIES",
    "MIXED_RANK_FAMILY",
    "adapters_from_runs",
    "load_bundled_patterns",
    "mixed_rank_adapters",
    "random_global_pattern",
    "synthetic_adapters",
    "target_module_shapes",
    "write_synthetic_run",
]
