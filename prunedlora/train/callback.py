"""The runner's own Trainer callbacks, the same for every method: the adapter's average rank in the
logs and on the progress bar. Each method's callbacks live in its package (``rank/callback.py``,
``loraprune/callback.py``, ``salr/training.py``) and come to the runner through ``Method.start``.
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from prunedlora.method import Method


class RankLogCallback(TrainerCallback):
    """Adds the adapter's current average rank to every training log entry (``avg_rank``)."""

    def __init__(self, method: Method) -> None:
        self.method = method

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["avg_rank"] = round(self.method.average_rank, 3)


class RankProgressCallback(ProgressCallback):
    """The Trainer's progress bar, with the latest loss, dev loss and the current average rank beside it."""

    def __init__(self, method: Method | None = None) -> None:
        super().__init__()
        self.method = method
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
            if self.method is not None:
                postfix["avg_rank"] = f"{self.method.average_rank:.2f}"
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
