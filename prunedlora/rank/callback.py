"""Trainer integration: PrunedLoRA's pruner driven by transformers' callback events.

``on_pre_optimizer_step`` fires after backward, gradient accumulation and clipping and before
``optimizer.step()``: the gradients the pruner scores are exactly the step's. Accelerate, torchrun and
DDP need nothing else: under DDP the gradients are already all-reduced there.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from prunedlora.errors import PrunedLoraError
from prunedlora.rank.pruner import RankPruner

logger = logging.getLogger(__name__)


class PrunedLoraCallback(TrainerCallback):
    """Prunes at the schedule's events; keeps pruned components dead; checkpoints the pruner."""

    def __init__(self, pruner: RankPruner) -> None:
        self.pruner = pruner

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resuming: the Trainer has restored weights, optimizer and step
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not RankPruner.has_saved_state(checkpoint):
                raise PrunedLoraError(
                    f"resuming at step {state.global_step} but {checkpoint} holds no pruner state; "
                    "it was not written by a PrunedLoRA run"
                )
            self.pruner.load(checkpoint)
            logger.info("restored pruner state from %s (average rank %.2f)", checkpoint, self.pruner.average_rank)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.pruner.before_optimizer_step(state.global_step, optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.after_optimizer_step()

    def on_save(self, args, state, control, **kwargs):
        self.pruner.consolidate_statistics()  # every process takes part; process 0 writes
        if state.is_world_process_zero:
            self.pruner.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")
