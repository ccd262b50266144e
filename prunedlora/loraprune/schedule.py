"""When LoRAPrune masks groups and how many have gone after each event.

The cubic ramp of ``prunedlora.rank.schedule.PruningSchedule`` (AdaLoRA's and LoRAPrune's): the pruned share
after step t is ``r_f * (1 - (1 - p)^3)`` with ``p = (t - start) / (end - start)``. That class counts
LoRA ranks of a ``PrunedLoraConfig``; here the counts are KV groups and channels per layer, so the same
formula is a small function of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prunedlora.loraprune.config import LorapruneConfig
from prunedlora.loraprune.errors import LorapruneError


def cubic_fraction(step: int, start: int, end: int) -> float:
    """The share of the final removal done after ``step``: 0 up to ``start``, 1 from ``end``."""
    if step <= start:
        return 0.0
    if step >= end:
        return 1.0
    return 1.0 - (1.0 - (step - start) / (end - start)) ** 3


@dataclass(frozen=True)
class PruneEvent:
    step: int
    groups_removed: int  # per pruned layer, in total after this event
    channels_removed: int


def prune_events(config: LorapruneConfig, total_steps: int, groups: int, channels: int) -> tuple[PruneEvent, ...]:
    """The events of a run of ``total_steps`` optimizer steps (0-based), computed up front so every
    process agrees; events that remove nothing new are dropped and the last reaches the final counts."""
    if total_steps < 1:
        raise LorapruneError(f"LoRAPrune needs at least one training step, got {total_steps}")
    start = math.floor(config.start * total_steps)
    end = min(total_steps - 1, max(start, math.ceil(config.end * total_steps) - 1))
    steps = list(range(start + config.prune_every, end + 1, config.prune_every))
    if not steps or steps[-1] != end:
        steps.append(end)
    events, previous = [], (0, 0)
    for step in steps:
        f = 1.0 if step == end else cubic_fraction(step, start, end)
        counts = (math.floor(groups * f + 1e-9), math.floor(channels * f + 1e-9))
        if counts != previous:
            events.append(PruneEvent(step, *counts))
            previous = counts
    return tuple(events)
