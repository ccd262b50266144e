"""Trainer integration: LoRAPrune's pruner driven by transformers' callback events."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from prunedlora.errors import PrunedLoraError
from prunedlora.loraprune.pruner import STATE_FILE, LoraPruner

logger = logging.getLogger(__name__)


class LorapruneCallback(TrainerCallback):
    """Drives LoRAPrune's pruner: scores and masks the base model's groups before each optimizer step,
    checkpoints its state beside the Trainer's and restores it on resume (masks never come back)."""

    def __init__(self, pruner: LoraPruner) -> None:
        self.pruner = pruner

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not (checkpoint / STATE_FILE).is_file():
                raise PrunedLoraError(
                    f"resuming at step {state.global_step} but {checkpoint} holds no {STATE_FILE}; "
                    "it was not written by a LoRAPrune run"
                )
            self.pruner.load(checkpoint)
            logger.info("restored LoRAPrune state from %s (%s)", checkpoint, self.pruner.summary)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.pruner.before_optimizer_step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.pruner.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            summary = self.pruner.summary
            logs["kv_groups_kept"] = summary["kv_groups_kept"]
            logs["channels_kept"] = summary["channels_kept"]
