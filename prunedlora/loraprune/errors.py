"""The errors of LoRAPrune: one line each, naming the setting or model and the fix."""

from __future__ import annotations

from prunedlora.errors import PrunedLoraError


class LorapruneError(PrunedLoraError):
    """A LoRAPrune setting, model or mask that cannot work; nothing was pruned or written."""


class SliceVerificationError(LorapruneError):
    """The sliced base + sliced adapter do not reproduce the masked training model; nothing was written."""
