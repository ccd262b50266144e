"""Criteria that read B's inputs ``z = A x``: a forward hook on each module's A folds every training
forward pass into a per-module statistic (``activation``: sum of ``z^2``; ``obs-input``: sum of ``z z^T``).

These come from each process's own batch, so they are ``input_kinds`` (summed over processes before
scoring, see ``base``), and they restart after every event: a score reads the inputs seen since the last one.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prunedlora.rank.criteria.base import Criterion


class InputStatistics(Criterion):
    """Collects one statistic of B's inputs per module; a subclass names it and says how a batch adds to it."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            cls.input_kinds = cls.reset_kinds = (cls.kind,)

    def empty(self) -> torch.Tensor:
        """The statistic before any input (float64 on the CPU)."""
        raise NotImplementedError

    def fold(self, stats: torch.Tensor, flat: torch.Tensor) -> None:
        """Add a batch of inputs ``flat`` (tokens x r0, float64) to ``stats`` in place."""
        raise NotImplementedError

    def setup(self) -> None:
        for name, module in self.modules.items():
            self.stats[self.kind][name] = self.empty()
            lora_a = module.layer.lora_A[self.adapter_name]

            def hook(_mod, _inputs, output, name=name):
                if _mod.training:
                    self.fold(
                        self.stats[self.kind][name], output.detach().reshape(-1, output.shape[-1]).to(torch.float64)
                    )

            self.hooks.append(lora_a.register_forward_hook(hook))
