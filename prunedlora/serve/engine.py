"""Offline batch generation over vLLM's engine, each prompt with its own adapter (or none).

The same validation and slot choice as the server, but in-process over ``vllm.LLM``: one
``generate`` call takes prompts paired with adapter names and lets vLLM batch them together.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prunedlora.errors import PrunedLoraError
from prunedlora.modelfacts import check_servable
from prunedlora.models import resolve_model
from prunedlora.serve.config import (
    DEFAULT_CPU_KV_CACHE_GIB,
    check_adapter_name,
    cpu_choice,
    lora_ops_env,
    resolve_device,
)
from prunedlora.serve.lora_ops import DEFAULT_LORA_OPS
from prunedlora.serve.slots import SlotPlan, plan_slots
from prunedlora.serve.validate import AdapterInfo, validate_adapter, validate_adapters
from prunedlora.serve.vllm_fixes import WORKER_EXTENSION


class EngineError(PrunedLoraError):
    """A request names an adapter the engine does not have, or the engine is closed."""


@dataclass
class Generation:
    """One prompt's answer."""

    prompt: str
    adapter: str | None
    text: str
    token_ids: list[int] = field(default_factory=list)


class OfflineEngine:
    """vLLM's ``LLM`` with named, validated LoRA adapters.

    ``max_lora_rank`` etc. default to what ``slots.plan_slots`` chooses for ``adapters``; adapters added
    later with :meth:`add_adapter` must fit that slot. ``kv_cache_gib`` defaults as in ``ServeConfig``
    (4 GiB on the CPU). On the CPU, dtype ``auto`` and vLLM's thread binding are chosen from the CPU
    (``prunedlora.cpu``; your ``VLLM_CPU_*`` variables win) and printed in one line to stderr unless
    ``echo`` is off. ``lora_ops`` is the LoRA compute in vLLM's CPU workers, ``rank-aware`` (default)
    or ``stock`` (vLLM's own; see ``ServeConfig``). ``llm_kwargs`` go to ``vllm.LLM`` unchanged.
    """

    def __init__(
        self,
        model: str | os.PathLike = "default",
        adapters: Mapping[str, str | os.PathLike] | None = None,
        *,
        max_lora_rank: int | None = None,
        max_loras: int | None = None,
        max_cpu_loras: int | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        device: str = "auto",
        kv_cache_gib: float | None = None,
        echo: bool = True,
        lora_ops: str = DEFAULT_LORA_OPS,
        **llm_kwargs: Any,
    ):
        self.lora_ops = lora_ops
        ops_env = lora_ops_env(lora_ops)
        self.model_dir = resolve_model(str(model), tokenizer=True)
        check_servable(self.model_dir)  # its architecture in the installed vLLM
        self.device = resolve_device(device)
        for name in adapters or {}:
            check_adapter_name(name)
        self.adapters: dict[str, AdapterInfo] = validate_adapters(dict(adapters or {}), self.model_dir)
        self.plan: SlotPlan = plan_slots(
            self.adapters, max_lora_rank=max_lora_rank, max_loras=max_loras, max_cpu_loras=max_cpu_loras
        )
        self._ids = {name: i + 1 for i, name in enumerate(self.adapters)}

        if self.device == "cpu":
            os.environ["VLLM_TARGET_DEVICE"] = "cpu"
        self.cpu_choice = cpu_choice(self.device, dtype, int(llm_kwargs.get("tensor_parallel_size", 1)))
        if self.cpu_choice is not None:
            dtype = self.cpu_choice.dtype
            if echo:
                print(self.cpu_choice.line(), file=sys.stderr, flush=True)
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir),
            enable_lora=True,
            max_lora_rank=self.plan.max_lora_rank,
            max_loras=self.plan.max_loras,
            max_cpu_loras=self.plan.max_cpu_loras,
            dtype=dtype,
            enforce_eager=self.device == "cpu" if enforce_eager is None else enforce_eager,
            worker_extension_cls=WORKER_EXTENSION,
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_gib is None and self.device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        kwargs.update(llm_kwargs)
        # vLLM reads its variables when the engine starts; set only for that, so they stay the user's own
        # (the LoRA ops choice is this engine's argument, so it wins over the environment's)
        added = {k: v for k, v in (self.cpu_choice.env if self.cpu_choice else {}).items() if k not in os.environ}
        saved = {k: os.environ.get(k) for k in [*added, *ops_env]}
        os.environ.update({**added, **ops_env})
        try:
            self.llm = LLM(**kwargs)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def add_adapter(self, name: str, path: str | os.PathLike) -> AdapterInfo:
        """Validate an adapter against this engine's base and slot and make it available by name."""
        check_adapter_name(name)
        if name in self.adapters:
            raise EngineError(f"adapter {name!r} is already registered")
        info = validate_adapter(path, self.model_dir, name=name, max_lora_rank=self.plan.max_lora_rank)
        self.adapters[name] = info
        self._ids[name] = max(self._ids.values(), default=0) + 1
        return info

    def lora_request(self, name: str | None):
        """vLLM's LoRARequest for an adapter name; None for the base model (None, "" or "base")."""
        if name in (None, "", "base", self.model_dir.name):
            return None
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none"
            raise EngineError(f"no adapter named {name!r} (adapters: {known}; use None for the base model)")
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, self._ids[name], str(self.adapters[name].path))

    def generate(
        self,
        requests: Sequence[tuple[str, str | None]],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        sampling_params: Any = None,
        use_tqdm: bool = True,
    ) -> list[Generation]:
        """Answer ``(prompt, adapter name or None)`` pairs in one vLLM batch, in order.

        Greedy by default, so answers are reproducible; pass vLLM ``SamplingParams`` for anything else.
        """
        if getattr(self, "llm", None) is None:
            raise EngineError("the engine is closed")
        from vllm import SamplingParams

        params = sampling_params or SamplingParams(temperature=temperature, max_tokens=max_tokens)
        prompts = [prompt for prompt, _ in requests]
        loras = [self.lora_request(name) for _, name in requests]
        outputs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=use_tqdm)
        return [
            Generation(
                prompt=prompt, adapter=name or None, text=out.outputs[0].text, token_ids=list(out.outputs[0].token_ids)
            )
            for (prompt, name), out in zip(requests, outputs)
        ]

    def close(self) -> None:
        """Stop vLLM's engine processes now rather than at interpreter exit."""
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass

    def __enter__(self) -> OfflineEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
