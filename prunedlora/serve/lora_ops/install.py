"""Choosing the LoRA compute in vLLM's worker processes: the rank-aware wrapper, or vLLM's own ops.

``serve``, the offline engine and ``bench latency`` pass ``serve.vllm_fixes.WORKER_EXTENSION`` as
vLLM's ``worker_extension_cls``; a worker imports it before it builds the model, and that import
calls :func:`install`. ``install``

1. applies ``vllm_fixes`` (vLLM's own CPU ops, fixed so that tokens without an adapter get none):
   what ``--lora-ops stock`` runs, and the fallback;
2. on vLLM's CPU platform only, points the platform's ``get_punica_wrapper`` (the hook vLLM asks for
   its LoRA wrapper class when it builds a model's LoRA layers) at :class:`RankAwarePunicaWrapperCPU`
   when the mode asks for it, and at vLLM's own class otherwise. The mode is read from
   ``PRUNEDLORA_LORA_OPS`` when vLLM asks, so one process can build engines in either mode.

Before the first rank-aware wrapper is handed out, :func:`self_check` runs it against vLLM's own
wrapper on a small batch (packed and plain layers, mixed ranks, a slot lacking a module, tokens
without an adapter, prefill and decode). If vLLM's wrapper or op signatures changed so that the
results differ or the call fails, vLLM's own ops are used and one line says so in vLLM's log.
On CUDA nothing is replaced: vLLM's punica kernels there already skip the per-token gather.
"""

from __future__ import annotations

import logging
import os

from prunedlora.serve.lora_ops import DEFAULT_LORA_OPS, LORA_OPS_ENV, LORA_OPS_MODES, RANK_AWARE, STOCK

logger = logging.getLogger("vllm.prunedlora")

RANK_AWARE_WRAPPER = "prunedlora.serve.lora_ops.punica_cpu.RankAwarePunicaWrapperCPU"

_state: dict = {"installed": False, "check": None}


def requested_mode() -> str:
    """The mode ``PRUNEDLORA_LORA_OPS`` asks for (default rank-aware); an unknown value means stock."""
    mode = os.environ.get(LORA_OPS_ENV, DEFAULT_LORA_OPS).strip() or DEFAULT_LORA_OPS
    if mode not in LORA_OPS_MODES:
        logger.warning(
            "prunedlora: %s=%r is not one of %s; using vLLM's own LoRA ops", LORA_OPS_ENV, mode, LORA_OPS_MODES
        )
        return STOCK
    return mode


def self_check() -> str | None:
    """Run the rank-aware wrapper against vLLM's own on a small batch; None if they agree, else why not."""
    try:
        from prunedlora.serve.lora_ops.check import compare_with_vllm

        return compare_with_vllm()
    except Exception as err:  # any failure means: do not use it
        return f"{type(err).__name__}: {err}"


def rank_aware_ready() -> bool:
    """Whether the rank-aware wrapper passed its check in this process (checked once, logged once)."""
    if _state["check"] is None:
        problem = self_check()
        _state["check"] = problem or ""
        if problem:
            logger.warning("prunedlora: rank-aware LoRA ops disagree with vLLM's (%s); using vLLM's own ops", problem)
        else:
            logger.info(
                "prunedlora: LoRA ops: rank-aware (tokens grouped by adapter, each at its live rank per module)"
            )
    return _state["check"] == ""


def model_is_compiled() -> bool:
    """Whether vLLM compiles the model it is building (torch.compile / Dynamo).

    The rank-aware wrapper groups tokens in Python between steps, which a single Dynamo trace would
    bake into the graph; so it is for eager models only. vLLM 0.32's CPU platform turns compilation
    off whenever LoRA is enabled, so this is a guard for a vLLM that stops doing so.
    """
    try:
        from vllm.config import CompilationMode, get_current_vllm_config_or_none
    except ImportError:
        return False
    config = get_current_vllm_config_or_none()
    return config is not None and config.compilation_config.mode != CompilationMode.NONE


def wrapper_for(mode: str, stock_wrapper: str) -> str:
    """The punica wrapper qualname for ``mode``: the rank-aware one when asked, checked and the model
    runs eagerly, else vLLM's."""
    if mode != RANK_AWARE:
        return stock_wrapper
    if model_is_compiled():
        logger.warning("prunedlora: vLLM compiles this model; rank-aware LoRA ops run eagerly only, using vLLM's own")
        return stock_wrapper
    return RANK_AWARE_WRAPPER if rank_aware_ready() else stock_wrapper


def install() -> str:
    """Make vLLM's CPU workers build their LoRA layers on the requested ops; returns what was done:
    'cpu' (the platform hook is in place), 'not-cpu' (CUDA and others keep vLLM's kernels) or
    'no-vllm'. Safe to call more than once."""
    from prunedlora.serve import vllm_fixes

    vllm_fixes.apply()
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return "no-vllm"
    if not current_platform.is_cpu():
        return "not-cpu"
    if _state["installed"]:
        return "cpu"
    platform_cls = type(current_platform)
    stock_get = platform_cls.get_punica_wrapper

    def get_punica_wrapper(cls) -> str:
        return wrapper_for(requested_mode(), stock_get())

    get_punica_wrapper.__doc__ = "prunedlora: the rank-aware LoRA wrapper unless PRUNEDLORA_LORA_OPS=stock."
    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)
    _state["installed"] = True
    return "cpu"
