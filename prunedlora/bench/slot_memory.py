"""The latency bench's vLLM worker extension (``worker_extension_cls``, imported inside vLLM's workers).

It subclasses serve's extension, so importing it also installs serve's LoRA ops (``serve.lora_ops``:
rank-aware, or vLLM's own with the fix that requests without an adapter get none, as the engine's
``lora_ops`` says), and adds one method the bench calls through ``LLM.collective_rpc``:
the bytes vLLM really reserved for LoRA slots, read from the stacked slot tensors of every LoRA layer
(``lora_a_stacked`` / ``lora_b_stacked`` in vllm/lora/layers/).
"""

from __future__ import annotations

from prunedlora.serve.vllm_worker import PrunedLoraWorkerExtension

BENCH_WORKER_EXTENSION = "prunedlora.bench.slot_memory.BenchWorkerExtension"


def _stacked(module, attr: str) -> list:
    value = getattr(module, attr, None)
    if value is None:
        return []
    return list(value) if isinstance(value, (tuple, list)) else [value]


class BenchWorkerExtension(PrunedLoraWorkerExtension):
    """serve's worker extension plus a read-out of the LoRA slot memory."""

    def lora_slot_bytes(self) -> dict:
        """Bytes of every LoRA slot tensor in this worker's model, in total and per layer kind."""
        model = self.model_runner.get_model()
        total, per_kind, dtype, layers = 0, {}, None, 0
        for name, module in model.named_modules():
            tensors = _stacked(module, "lora_a_stacked") + _stacked(module, "lora_b_stacked")
            if not tensors:
                continue
            layers += 1
            size = sum(t.numel() * t.element_size() for t in tensors)
            kind = name.rsplit(".", 1)[-1]
            per_kind[kind] = per_kind.get(kind, 0) + size
            total += size
            dtype = str(tensors[0].dtype).replace("torch.", "")
        return {"total_bytes": total, "per_kind_bytes": per_kind, "dtype": dtype, "lora_layers": layers}
