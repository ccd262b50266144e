"""LorapruneConfig: how LoRAPrune (arXiv 2305.18403) prunes the base model while a LoRA trains.

One record holds every choice so a recipe, the CLI and Python callers agree, and a setting that cannot
work is refused on construction with one line rather than after an hour of training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prunedlora.loraprune.errors import LorapruneError

EXEMPTIONS = ("none", "released")


@dataclass
class LorapruneConfig:
    """What to prune, how to score it and when.

    - ``criterion``: ``lora`` estimates the base weight's gradient from the LoRA factors' gradients (the
      paper's method, no extra memory); ``grad`` uses the true gradient of the frozen weight (LLM-Pruner's
      first-order criterion, costs a gradient buffer per base weight: that cost is what the comparison
      measures); ``magnitude`` the merged weight's size; ``random`` a seeded score (a sanity floor);
      ``lora-act`` (not in the paper) ``lora``'s score times the norm of each input feature over the
      step's tokens, Wanda-style, so channels that carry massive activations are kept.
    - ``sparsity``: the fraction of the prunable decoder linear weights (q/k/v/o, gate/up/down of every
      layer) to remove; heads go by whole KV groups, so the achieved fraction is the closest reachable
      one (see ``groups.PrunePlan.achieved_sparsity``).
    - ``start`` / ``end``: fractions of the training steps between which the cubic ramp runs (nothing
      is pruned before ``start``; the target holds from ``end``); an event every ``prune_every`` steps.
    - ``ema``: the moving average of importance, ``I <- ema * I + (1 - ema) * I_step``.
    - ``exempt_layers``: ``none`` prunes every layer the same amount, which a standard config (one
      ``num_key_value_heads`` and one ``intermediate_size`` for all layers) needs; ``released`` keeps the
      first 10% of layers and the last one full as the released code does, for masked-model studies
      only: such a model cannot be exported to a standard config and slicing refuses it.
    """

    criterion: str = "lora"
    sparsity: float = 0.5
    prune_heads: bool = True
    prune_channels: bool = True
    start: float = 0.1
    end: float = 0.9
    prune_every: int = 10
    ema: float = 0.9
    exempt_layers: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        from prunedlora.fieldtypes import check_field_types

        check_field_types(self, LorapruneError)  # types first: the range checks below compare values
        from prunedlora.loraprune.criteria import CRITERIA  # registered classes (criteria.py)

        if CRITERIA.find(self.criterion) is None:
            raise LorapruneError(f"criterion must be one of {', '.join(CRITERIA.names())}, got {self.criterion!r}")
        if not 0.0 < self.sparsity < 1.0:
            raise LorapruneError(
                f"sparsity must lie strictly between 0 and 1 (the fraction of prunable weights removed), "
                f"got {self.sparsity}"
            )
        if not (self.prune_heads or self.prune_channels):
            raise LorapruneError("prune_heads and prune_channels are both false: nothing could be pruned")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise LorapruneError(f"start and end must satisfy 0 <= start < end <= 1, got {self.start} and {self.end}")
        if self.prune_every < 1:
            raise LorapruneError(f"prune_every must be a positive number of steps, got {self.prune_every}")
        if not 0.0 <= self.ema < 1.0:
            raise LorapruneError(f"ema must lie in [0, 1), got {self.ema}")
        if self.exempt_layers not in EXEMPTIONS:
            raise LorapruneError(f"exempt_layers must be one of {', '.join(EXEMPTIONS)}, got {self.exempt_layers!r}")

    def exempt(self, num_layers: int) -> tuple[int, ...]:
        """The layers kept full: none, or (``released``) the first 10% (at least one) and the last."""
        if self.exempt_layers == "none":
            return ()
        first = max(1, int(num_layers * 0.1))
        return tuple(sorted(set(range(first)) | {num_layers - 1}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LorapruneConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise LorapruneError(f"unknown loraprune setting(s): {', '.join(unknown)}")
        return cls(**data)
