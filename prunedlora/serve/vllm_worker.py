"""Imported by vLLM inside its worker processes (``worker_extension_cls``): installs prunedlora's LoRA
compute (``serve.lora_ops.install``: the rank-aware ops, or vLLM's own with ``vllm_fixes``)."""

from prunedlora.serve.lora_ops.install import install

install()


class PrunedLoraWorkerExtension:
    """Named as vLLM's ``worker_extension_cls`` so that workers import this module; adds no methods."""
