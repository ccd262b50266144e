"""The latency bench's vLLM worker extension (``worker_extension_cls``, imported inside vLLM's workers).

It subclasses serve's extension, so importing it also installs serve's LoRA ops (``serve.lora_ops``:
rank-aware, or vLLM's own with the fix that requests without an adapter get none, as the engine's
``lora_ops`` says), and adds two methods the bench calls through ``LLM.collective_rpc``: the bytes
vLLM really reserved for LoRA slots, read from the stacked slot tensors of every LoRA layer
(``lora_a_stacked`` / ``lora_b_stacked`` in vllm/lora/layers/), and the LoRA ops the layers really
got (their ``punica_wrapper``'s class: the rank-aware ops fall back to vLLM's own when their start-up
check fails, and CUDA keeps vLLM's kernels), so a row never claims ops it did not run.
"""

from __future__ import annotations

from prunedlora.serve.vllm_worker import PrunedLoraWorkerExtension

BENCH_WORKER_EXTENSION = "prunedlora.bench.slot_memory.BenchWorkerExtension"
# punica wrapper class -> LoRA ops mode, as ``--lora-ops`` names them
WRAPPER_MODES = {"RankAwarePunicaWrapperCPU": "rank-aware", "PunicaWrapperCPU": "stock"}


def ops_mode(wrappers: list[str]) -> str:
    """The LoRA ops mode of a model whose LoRA layers use these punica wrapper classes: ``rank-aware``
    or ``stock`` when all agree on one of those, else ``vLLM <classes>`` (e.g. CUDA's kernels), or
    ``none`` without LoRA layers."""
    if not wrappers:
        return "none"
    modes = {WRAPPER_MODES.get(w) for w in wrappers}
    if len(modes) == 1 and None not in modes:
        return modes.pop()
    return "vLLM " + ", ".join(sorted(wrappers))


def _stacked(module, attr: str) -> list:
    value = getattr(module, attr, None)
    if value is None:
        return []
    return list(value) if isinstance(value, (tuple, list)) else [value]


class BenchWorkerExtension(PrunedLoraWorkerExtension):
    """serve's worker extension plus read-outs of the LoRA slot memory and of the LoRA ops in use."""

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

    def lora_ops_in_use(self) -> dict:
        """The punica wrapper classes of this worker's LoRA layers and the mode they are (``ops_mode``)."""
        model = self.model_runner.get_model()
        wrappers = sorted({type(m.punica_wrapper).__name__ for m in model.modules() if hasattr(m, "punica_wrapper")})
        return {"wrappers": wrappers, "mode": ops_mode(wrappers)}
