"""The LoRA compute prunedlora installs into vLLM's CPU workers: tokens grouped by adapter slot, each
adapter at its own live rank per module (so a module pruned to rank 3 costs rank 3 whatever the slot).

vLLM's CPU ops (``vllm/lora/ops/torch_ops``, vLLM 0.32) gather a (tokens, out, slot rank) copy of every
token's padded slot weights per projection; these compute one matmul per adapter present in the batch,
sliced to the rank that adapter really has. Layout, one job a file (as vLLM's ``punica_wrapper/``):

- ``weights``: each slot's live rank per module, read from vLLM's padded slot tensors, and the
  per-slot weight slices, cached until vLLM writes the slot again;
- ``kernels``: the grouped torch kernels, and drop-ins for vLLM's six ``bgmv``/``sgmv`` ops;
- ``punica_cpu``: a subclass of vLLM's ``PunicaWrapperCPU`` that uses them (imports vLLM);
- ``install``: choosing it in vLLM's workers, behind a start-up check against vLLM's own ops
  (``check``: the check's small batch).

Only the names below are light (no torch, no vLLM): the configs and the CLI read them.
"""

from __future__ import annotations

RANK_AWARE = "rank-aware"
STOCK = "stock"
LORA_OPS_MODES = (RANK_AWARE, STOCK)
DEFAULT_LORA_OPS = RANK_AWARE
# How the choice reaches vLLM's worker processes, which inherit the environment of whoever starts them.
LORA_OPS_ENV = "PRUNEDLORA_LORA_OPS"

__all__ = ["DEFAULT_LORA_OPS", "LORA_OPS_ENV", "LORA_OPS_MODES", "RANK_AWARE", "STOCK"]
