"""Start vLLM in its own process group, and end it together with every process it started.

vLLM's server starts an API process, an engine core and workers. Started with ``start_new_session``
(its own process group) and, on Linux, a parent-death signal, the whole tree can be stopped with one
signal to the group, and a killed ``prunedlora serve`` leaves no server behind.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading


def start_process(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output piped (stdout and stderr together), stdin closed."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    return subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop_process() ends vLLM's children with it
        preexec_fn=_die_with_parent_hook() if on_main_thread else None,
    )


def stop_process(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """End a process started by ``start_process`` and all it started: SIGTERM to the group, SIGKILL
    what outlives it, then reap the rest."""
    descendants = _descendants(process.pid)
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
    _reap(process.pid, descendants)


def _die_with_parent_hook():
    """A pre-exec hook that makes the child get SIGTERM when this process dies (Linux), so a killed
    ``prunedlora serve`` leaves no server; None elsewhere.

    prctl is looked up here, in the parent: the hook runs between fork and exec, where importing or
    loading a library could deadlock on a lock another thread held at fork time.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return functools.partial(prctl, 1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:
        return []


def _reap(pgid: int, descendants: list, timeout_s: float = 10.0) -> None:
    """Wait for what vLLM started to exit after its main process did; kill what does not."""
    try:
        import psutil
    except ImportError:
        _signal_group(pgid, signal.SIGKILL)
        return
    group = [p for p in psutil.process_iter() if _pgid(p) == pgid]
    alive = {p.pid: p for p in [*descendants, *group]}
    gone, still = psutil.wait_procs(list(alive.values()), timeout=timeout_s)
    for proc in still:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=5)


def _pgid(proc) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None
