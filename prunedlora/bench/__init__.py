"""Benchmarks anyone can rerun: what pruned ranks buy in vLLM serving latency (``latency``) and what
they cost in quality against plain LoRA and AdaLoRA (``quality``).

``latency`` runs each vLLM engine setting in its own process (``latency_worker``) over bench adapters
made by ``adapters``; ``quality`` trains cached cells through ``prunedlora.train`` (and ``adalora``
for PEFT's AdaLoRA) and scores them with ``scoring``; ``report`` writes their tables and plots.
Names are imported lazily, so importing this package (as the CLI does) costs nothing.
"""

from __future__ import annotations

from prunedlora.lazy import lazy_exports

_EXPORTS = {
    "LatencyBenchConfig": "latency",
    "run_latency_bench": "latency",
    "demo_latency": "latency",
    "lora_slot_bytes_estimate": "latency",
    "QualityBenchConfig": "quality",
    "run_quality_bench": "quality",
    "preset_config": "quality",
    "cell_command": "quality",
    "plan_cells": "quality",
    "train_adalora": "adalora",
    "score_adapter": "scoring",
    "synthetic_adapters": "adapters",
    "adapters_from_runs": "adapters",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
