"""Whether pruned adapters are as good as plain LoRA: `prunedlora bench quality` as a script.

Trains and scores cells (task x method x seed) cached by configuration, so an interrupted table
resumes when the same command is run again; writes benchmarks/results/quality.{json,md,png}.
docs/results.md quotes it. The default preset is small (SST-2, four methods, one seed,
40 steps); `--preset full` is the whole table of issue 5 (hours on a 2-core CPU).

    python benchmarks/quality.py [--preset full] [--tasks sst2,gsm8k] [--seeds 0,1] [--list]

Every option of `prunedlora bench quality --help` works here.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from prunedlora.cli import main

    sys.exit(main(["bench", "quality", *sys.argv[1:]]))
