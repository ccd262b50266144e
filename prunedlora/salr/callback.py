"""Trainer integration: SALR's residual damping around every optimizer step (see ``residual``)."""

from __future__ import annotations

from transformers import TrainerCallback

from prunedlora.salr.residual import ResidualDamping


class ResidualDampingCallback(TrainerCallback):
    """Runs a ``ResidualDamping`` around every optimizer step of a transformers Trainer."""

    def __init__(self, damping: ResidualDamping):
        self.damping = damping

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.damping.snapshot()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.damping.restore()
