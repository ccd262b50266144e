"""Two processes (torchrun, gloo, CPU) take the same pruning decisions and end with the same weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_two_process_run_ends_identical_on_both_ranks(tiny_model_path, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(Path(__file__).with_name("ddp_worker.py")), str(tiny_model_path), str(tmp_path / "run"), str(dump)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["ranks"] == rank1["ranks"]
    assert sum(rank0["ranks"].values()) == 3 * len(rank0["ranks"])
    assert len(set(rank0["ranks"].values())) > 1
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key
    assert (tmp_path / "run" / "masks.safetensors").is_file()
