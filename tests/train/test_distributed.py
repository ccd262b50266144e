"""Two processes (torchrun, gloo, CPU) take the same pruning decisions and end with the same weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _torchrun(model_dir, run_dir, dump, mode="full", port=29533):
    dump.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(Path(__file__).with_name("ddp_worker.py")),
        str(model_dir),
        str(run_dir),
        str(dump),
        mode,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_run_ends_identical_on_both_ranks_and_resumes_to_the_same_result(tiny_model_path, tmp_path):
    """Resume under DDP: a 2-process run interrupted at step 5 (checkpoints every 2 steps) and run again
    begins at step 4 on both processes and ends with the uninterrupted run's ranks and weights.
    Break: resume that ignores the checkpoint -> begin_step 0: red; pruner state not restored
    (activation statistics or masks) -> other decisions or weights: red."""
    proc = _torchrun(tiny_model_path, tmp_path / "run", tmp_path / "dump")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2 and rank0["begin_step"] == 0
    assert rank0["ranks"] == rank1["ranks"]
    assert sum(rank0["ranks"].values()) == 3 * len(rank0["ranks"])
    assert len(set(rank0["ranks"].values())) > 1
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key
    assert (tmp_path / "run" / "masks.safetensors").is_file()

    crashed = _torchrun(tiny_model_path, tmp_path / "resumed", tmp_path / "crash", "crash", port=29534)
    assert crashed.returncode != 0 and "simulated interruption" in crashed.stderr
    assert (tmp_path / "resumed" / "checkpoint-4").is_dir() and not (tmp_path / "resumed" / "checkpoint-6").exists()
    proc = _torchrun(tiny_model_path, tmp_path / "resumed", tmp_path / "resume", "resume", port=29535)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in (0, 1):
        resumed = torch.load(tmp_path / "resume" / f"rank{r}.pt")
        assert resumed["begin_step"] == 4
        assert resumed["ranks"] == rank0["ranks"]
        for key, value in rank0["weights"].items():
            torch.testing.assert_close(resumed["weights"][key], value, atol=1e-6, rtol=0, msg=key)
