"""Serve many heterogeneous-rank LoRA adapters from one base model with vLLM multi-LoRA.

``validate`` checks an adapter before vLLM sees it, ``slots`` chooses vLLM's LoRA slot settings,
``server`` runs vLLM's OpenAI-compatible server, ``runtime`` adds and removes adapters on it, and
``engine`` is the offline batch engine over ``vllm.LLM``. Names are imported lazily, so importing
this package (as the CLI does) costs nothing.
"""

from __future__ import annotations

from prunedlora.lazy import lazy_exports

_EXPORTS = {
    "AdapterInfo": "validate",
    "AdapterValidationError": "validate",
    "validate_adapter": "validate",
    "validate_adapters": "validate",
    "SlotPlan": "slots",
    "SlotError": "slots",
    "plan_slots": "slots",
    "ServeConfig": "server",
    "ServeError": "server",
    "VllmServer": "server",
    "serve": "server",
    "serve_and_ask": "server",
    "complete": "client",
    "chat": "client",
    "add_adapter": "runtime",
    "remove_adapter": "runtime",
    "list_adapters": "runtime",
    "RuntimeAdapterError": "runtime",
    "OfflineEngine": "engine",
    "Generation": "engine",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
