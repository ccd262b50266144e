"""Trainer integration: the pruner driven by transformers' callback events.

``on_pre_optimizer_step`` fires after backward, gradient accumulation and clipping and before
``optimizer.step()``: the gradients the pruner scores are exactly the step's. Accelerate, torchrun and
DDP need nothing else: under DDP the gradients are already all-reduced there.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from prunedlora.errors import PrunedLoraError
from prunedlora.loraprune.pruner import STATE_FILE, LoraPruner
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

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["avg_rank"] = round(self.pruner.average_rank, 3)


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


class RankProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with the latest loss, dev loss and the current average rank beside it."""

    def __init__(self, pruner: RankPruner | None = None) -> None:
        super().__init__()
        self.pruner = pruner
        self._loss: float | None = None
        self._dev_loss: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is not None:
            postfix = {}
            if self._loss is not None:
                postfix["loss"] = f"{self._loss:.4f}"
            if self._dev_loss is not None:
                postfix["dev_loss"] = f"{self._dev_loss:.4f}"
            if self.pruner is not None:
                postfix["avg_rank"] = f"{self.pruner.average_rank:.2f}"
            self.training_bar.set_postfix(postfix, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._loss = float(logs["loss"])
        if logs and "eval_loss" in logs:
            self._dev_loss = float(logs["eval_loss"])
        if state.is_world_process_zero and self.training_bar is not None and logs and "train_runtime" in logs:
            self.training_bar.write(
                f"train_runtime {logs['train_runtime']:.1f}s, train_loss {logs.get('train_loss', float('nan')):.4f}"
            )
