"""What this CPU computes fast, and the dtype and thread binding chosen from it.

vLLM's CPU build runs the model in its dtype (bf16 for SmolLM2) whether or not the CPU computes bf16
natively: without AVX512-bf16 or AMX it emulates bf16, several times slower than float32 (issue 16:
13 against 60 tokens/s on a 2-core AVX2 EPYC). It also reserves one core for its scheduler, which on
a 2-core machine halves the cores the model runs on. So the serving paths (``prunedlora serve``, the
offline engine, ``bench latency``, the demo) ask :func:`decide` once:

- dtype ``auto`` becomes ``bfloat16`` where the CPU has native bf16 and ``float32`` elsewhere; an
  explicit ``--dtype`` is kept as given;
- on a machine with at most ``FEW_CORES`` cores every core this process may use is bound for vLLM's
  OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND=0-N``) instead of vLLM reserving one; a user's own
  ``VLLM_CPU_OMP_THREADS_BIND`` or ``VLLM_CPU_NUM_OF_RESERVED_CPU`` is never overridden.

The decision is a pure function of a :class:`CpuInfo` (read from ``/proc/cpuinfo``, or recorded)
and the environment, so it is tested on recorded flag sets of other machines. :func:`machine_record`
is the one description of the machine every results file stores.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

# Flags that decide the figures: bf16 is native with AVX512-bf16 or AMX (x86) or the bf16 extension
# (aarch64, "bf16" in Features); avx512f and avx2 set the speed of everything else.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16")
# vLLM's variables for thread binding: when either is set, the user chose and nothing is bound here.
BIND_VAR = "VLLM_CPU_OMP_THREADS_BIND"
RESERVED_VAR = "VLLM_CPU_NUM_OF_RESERVED_CPU"
# Up to this many cores, giving one to vLLM's scheduler costs more than the scheduler's contention
# (measured on 2 cores: 60 -> 95 tokens/s with both bound).
FEW_CORES = 8


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as the decision sees it: model name, architecture, feature flags, usable CPU ids."""

    model: str
    arch: str
    flags: frozenset[str]
    cpus: tuple[int, ...]

    @property
    def cores(self) -> int:
        return len(self.cpus)

    @property
    def native_bf16(self) -> bool:
        return any(flag in self.flags for flag in NATIVE_BF16_FLAGS)

    @property
    def relevant_flags(self) -> list[str]:
        return [flag for flag in RELEVANT_FLAGS if flag in self.flags]


def parse_cpuinfo(text: str, cpus: tuple[int, ...], arch: str = "x86_64") -> CpuInfo:
    """A CpuInfo from the text of /proc/cpuinfo (the first processor's model name and flags)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if not sep:
            continue
        if not model and key in ("model name", "cpu model", "hardware"):
            model = value.strip()
        elif not flags and key in ("flags", "features"):
            flags = frozenset(value.split())
    return CpuInfo(model=model or platform.processor() or arch, arch=arch, flags=flags, cpus=tuple(cpus))


def read_cpu_info() -> CpuInfo:
    """This machine's CPU: /proc/cpuinfo where there is one, and the CPU ids this process may run on."""
    try:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cpus = tuple(range(os.cpu_count() or 1))
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text, cpus, platform.machine() or "unknown")


def resolve_dtype(requested: str, cpu: CpuInfo) -> str:
    """``requested`` unless it is ``auto``; then bfloat16 where the CPU computes it natively, else float32.

    The same rule serves vLLM's ``--dtype`` and bf16 autocast in training and scoring."""
    if requested != "auto":
        return requested
    return "bfloat16" if cpu.native_bf16 else "float32"


def cpu_list(cpus: tuple[int, ...]) -> str:
    """CPU ids as vLLM and taskset write them: ``0-3,6``."""
    parts: list[str] = []
    ids = sorted(set(cpus))
    start = prev = None
    for cpu in [*ids, None]:
        if cpu is not None and prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    return ",".join(parts)


@dataclass(frozen=True)
class CpuChoice:
    """The dtype and vLLM environment chosen for a CPU, with why, and how to report it."""

    cpu: CpuInfo
    dtype: str
    dtype_reason: str
    env: dict[str, str] = field(default_factory=dict)
    binding: str = ""

    def line(self) -> str:
        """The one line the commands print."""
        flags = ", ".join(self.cpu.relevant_flags) or "none of " + "/".join(RELEVANT_FLAGS[:4])
        return (
            f"cpu: {self.cpu.model} ({flags}), {self.cpu.cores} cores -> dtype {self.dtype} ({self.dtype_reason}); "
            f"threads: {self.binding}"
        )

    def apply(self, env: MutableMapping[str, str]) -> MutableMapping[str, str]:
        """Set the chosen vLLM variables in ``env`` (never replacing one already there); returns it."""
        for key, value in self.env.items():
            env.setdefault(key, value)
        return env

    def record(self) -> dict:
        return {
            "dtype": self.dtype,
            "dtype_reason": self.dtype_reason,
            "thread_binding": self.binding,
            "vllm_env": dict(self.env),
        }


def decide(cpu: CpuInfo, dtype: str = "auto", env: Mapping[str, str] | None = None, world_size: int = 1) -> CpuChoice:
    """The dtype and thread binding for vLLM's CPU build on ``cpu``; ``dtype`` and ``env`` are the user's.

    ``world_size`` > 1 (tensor parallelism) keeps vLLM's own binding, which splits cores per rank."""
    env = os.environ if env is None else env
    if dtype == "auto":
        reason = "auto: native bf16" if cpu.native_bf16 else "auto: no native bf16, float32 is faster"
    else:
        reason = "--dtype"
    chosen = resolve_dtype(dtype, cpu)
    user = {key: env[key] for key in (BIND_VAR, RESERVED_VAR) if env.get(key) not in (None, "")}
    if user:
        binding = ", ".join(f"{key}={value}" for key, value in user.items()) + " (yours)"
        return CpuChoice(cpu, chosen, reason, {}, binding)
    if cpu.cores <= FEW_CORES and world_size == 1:
        bind = {BIND_VAR: cpu_list(cpu.cpus)}
        return CpuChoice(cpu, chosen, reason, bind, f"all {cpu.cores} cores bound ({BIND_VAR}={bind[BIND_VAR]})")
    return CpuChoice(cpu, chosen, reason, {}, "vLLM's default (one core reserved for its scheduler)")


def autocast_bf16(cpu: CpuInfo | None = None) -> bool:
    """Whether bf16 autocast is worth it for training or scoring here: only with native bf16."""
    return resolve_dtype("auto", cpu or read_cpu_info()) == "bfloat16"


def machine_record(
    choice: CpuChoice | None = None, *, cpu: CpuInfo | None = None, dtype: str | None = None, threads: str | None = None
) -> dict:
    """The machine as every results file records it: CPU model, relevant flags, cores used, dtype and
    thread binding (from a vLLM ``choice``, or ``dtype``/``threads`` for torch), and a one-line summary."""
    cpu = choice.cpu if choice is not None else (cpu or read_cpu_info())
    record = {
        "cpu": cpu.model,
        "arch": cpu.arch,
        "flags": cpu.relevant_flags,
        "native_bf16": cpu.native_bf16,
        "cores": cpu.cores,
        "os": f"{platform.system()} {platform.release()}",
    }
    if choice is not None:
        record.update(choice.record())
    else:
        if dtype is not None:
            record["dtype"] = dtype
        if threads is None:
            try:
                import torch

                threads = f"torch, {torch.get_num_threads()} threads"
            except ImportError:
                threads = None
        if threads is not None:
            record["thread_binding"] = threads
    record["description"] = machine_line(record)
    return record


def machine_line(machine: dict | str | None) -> str:
    """One line for a results table: a machine record, or the plain string older results hold."""
    if not isinstance(machine, dict):
        return str(machine)
    flags = ", ".join(machine.get("flags") or []) or "no avx2/avx512"
    text = f"{machine.get('cpu')} ({flags}), {machine.get('cores')} cores"
    if machine.get("dtype"):
        text += f", {machine['dtype']}"
    if machine.get("thread_binding"):
        text += f", threads: {machine['thread_binding']}"
    return text
