"""Serve many heterogeneous-rank LoRA adapters from one base model with vLLM multi-LoRA.

``validate`` checks an adapter before vLLM sees it, ``slots`` chooses vLLM's LoRA slot settings,
``config`` holds what a server or engine is asked for, ``server`` runs vLLM's OpenAI-compatible server
(started and reaped by ``process``, its record for ``adapters add`` in ``record``), ``http`` and
``client`` talk to it, ``runtime`` adds and removes adapters on it, ``engine`` is the offline batch
engine over ``vllm.LLM``, and ``cli`` parses the commands and prints what they do. Imports go one
way: config, then http/record/process, then server, then cli. Names are imported lazily, so importing
this package (as the CLI does) costs nothing.
"""

from __future__ import annotations

from prunedlora.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    validate=("AdapterInfo", "AdapterValidationError", "validate_adapter", "validate_adapters"),
    slots=("SlotPlan", "SlotError", "plan_slots"),
    config=("ServeConfig", "ServeError"),
    server=("VllmServer",),
    cli=("serve", "serve_and_ask"),
    client=("complete", "chat"),
    runtime=("add_adapter", "remove_adapter", "list_adapters", "RuntimeAdapterError"),
    engine=("OfflineEngine", "Generation"),
)
