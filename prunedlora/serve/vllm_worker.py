"""Imported by vLLM inside its worker processes (``worker_extension_cls``); applies ``vllm_fixes``."""

from prunedlora.serve.vllm_fixes import apply

apply()


class PrunedLoraWorkerExtension:
    """Named as vLLM's ``worker_extension_cls`` so that workers import this module; adds no methods."""
