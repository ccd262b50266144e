"""LoRAPrune (arXiv 2305.18403): structured pruning of the base model guided by a training LoRA.

config.py holds the settings, groups.py which weights form a GQA-legal KV group or an MLP channel and
how many go, importance.py scores them from the LoRA factors' gradients, masks.py hides pruned groups
during training, pruner.py drives scoring and masking one optimizer step at a time, slicing.py writes
the smaller standard model and its sliced adapter, verified against the masked model. Heavy imports
happen on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunedlora.lazy import lazy_exports
from prunedlora.loraprune.config import LorapruneConfig
from prunedlora.loraprune.errors import LorapruneError, SliceVerificationError

if TYPE_CHECKING:
    from prunedlora.loraprune.export import export_pruned
    from prunedlora.loraprune.masks import GroupMasks
    from prunedlora.loraprune.pruner import LoraPruner
    from prunedlora.loraprune.slicing import PrunedModel, write_pruned

__all__ = [
    "GroupMasks",
    "LoraPruner",
    "LorapruneConfig",
    "LorapruneError",
    "PrunedModel",
    "SliceVerificationError",
    "export_pruned",
    "write_pruned",
]
__getattr__, _ = lazy_exports(
    __name__,
    export=("export_pruned",),
    masks=("GroupMasks",),
    pruner=("LoraPruner",),
    slicing=("PrunedModel", "write_pruned"),
)
