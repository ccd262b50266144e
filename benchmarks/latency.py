"""What pruned ranks buy in vLLM serving latency: `prunedlora bench latency` as a script.

Measures, in one run on the same prompts, the base model, adapters at r0, pruned adapters in the
smallest slot that holds them and padded to the r0 slot, a slot-rank sweep and mixes of 1, 4 and 16
adapters per batch; writes benchmarks/results/latency.{json,md,png}. docs/results.md quotes it.

    python benchmarks/latency.py [--run RUN_DIR ...] [--prompts 16] [--output-tokens 32] [--slots 8,32,64]

Every option of `prunedlora bench latency --help` works here.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # vLLM starts engine processes: the guard keeps them from rerunning this
    from prunedlora.cli import main

    sys.exit(main(["bench", "latency", *sys.argv[1:]]))
