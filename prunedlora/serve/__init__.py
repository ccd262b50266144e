"""Serve many heterogeneous-rank LoRA adapters from one base model with vLLM multi-LoRA.

``validate`` checks an adapter before vLLM sees it, ``slots`` chooses vLLM's LoRA slot settings,
``server`` runs vLLM's OpenAI-compatible server, ``runtime`` adds and removes adapters on it, and
``engine`` is the offline batch engine over ``vllm.LLM``. Names are imported lazily, so importing
this package (as the CLI does) costs nothing.
"""

from __future__ import annotations

from prunedlora.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    validate=("AdapterInfo", "AdapterValidationError", "validate_adapter", "validate_adapters"),
    slots=("SlotPlan", "SlotError", "plan_slots"),
    server=("ServeConfig", "ServeError", "VllmServer", "serve", "serve_and_ask"),
    client=("complete", "chat"),
    runtime=("add_adapter", "remove_adapter", "list_adapters", "RuntimeAdapterError"),
    engine=("OfflineEngine", "Generation"),
)
