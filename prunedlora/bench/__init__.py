"""Benchmarks anyone can rerun: what pruned ranks buy in vLLM serving latency (``latency``) and what
they cost in quality against plain LoRA and AdaLoRA (``quality``).

``latency`` runs each vLLM engine setting in its own process (``latency_worker``) over bench adapters
made by ``adapters``; ``quality`` trains cached cells through ``prunedlora.train`` (and ``adalora``
for PEFT's AdaLoRA) and scores them with ``scoring``; ``report`` writes their tables and plots.
Names are imported lazily, so importing this package (as the CLI does) costs nothing.
"""

from __future__ import annotations

from prunedlora.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    latency=("LatencyBenchConfig", "run_latency_bench", "demo_latency", "lora_slot_bytes_estimate"),
    quality=("QualityBenchConfig", "run_quality_bench", "preset_config", "cell_command", "plan_cells"),
    adalora=("train_adalora",),
    scoring=("score_adapter",),
    adapters=("synthetic_adapters", "adapters_from_runs"),
)
