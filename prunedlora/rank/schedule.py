"""When pruning events happen and how many components remain after each one."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prunedlora.rank.config import PrunedLoraConfig


@dataclass(frozen=True)
class PruningEvent:
    """After the event at optimizer step ``step``: at most ``total`` components in all modules (global
    allocation), ``per_module`` in each (uniform allocation) and no module above ``cap``."""

    step: int
    total: int
    per_module: int
    cap: int


@dataclass(frozen=True)
class PruningSchedule:
    """Every pruning event of a run, computed up front so that all processes agree on it.

    - ``cubic``: the remaining budget follows ``final + (initial - final) * (1 - p)^3`` where p goes
      from ``every / (end - start + every)`` at the first event (``prune_start_step``) to 1 at the last
      (``prune_end_step``), as AdaLoRA and LoRAPrune do. Removes many components early, few late.
    - ``constant``: every ``prune_every`` steps each module loses ``components_per_event`` (the paper's
      released code: k=2 every 10 steps) until the target is reached; the last event takes exactly
      what is left.
    The last event always leaves exactly the final budget, so the final average rank is the target.
    """

    events: tuple[PruningEvent, ...]
    num_modules: int
    r0: int
    final_total: int

    @classmethod
    def build(cls, config: PrunedLoraConfig, num_modules: int) -> PruningSchedule:
        n, r0 = num_modules, config.r0
        final_total = config.final_total_rank(n)
        initial = n * r0
        uniform = config.allocation == "uniform"
        if uniform:
            final_per_module = final_total // n
        if config.schedule == "cubic":
            steps = list(range(config.prune_start_step, config.prune_end_step + 1, config.prune_every))
            if steps[-1] != config.prune_end_step:
                steps.append(config.prune_end_step)
            span = config.prune_end_step - config.prune_start_step + config.prune_every
            events = []
            for step in steps:
                p = min(1.0, (step - config.prune_start_step + config.prune_every) / span)
                remaining = (1.0 - p) ** 3
                total = final_total + math.ceil((initial - final_total) * remaining - 1e-9)
                cap = config.max_rank + math.ceil((r0 - config.max_rank) * remaining - 1e-9)
                per_module = final_per_module + math.ceil((r0 - final_per_module) * remaining - 1e-9) if uniform else 0
                events.append(PruningEvent(step, total, per_module, cap))
        else:
            k = config.components_per_event
            events, i = [], 1
            while True:
                step = config.prune_start_step + (i - 1) * config.prune_every
                total = max(final_total, initial - i * k * n)
                per_module = max(final_total // n, r0 - i * k) if uniform else 0
                cap = max(config.max_rank, r0 - i * k)
                events.append(PruningEvent(step, total, per_module, cap))
                if total == final_total and (not uniform or per_module == final_total // n) and cap == config.max_rank:
                    break
                i += 1
        if uniform:
            events = [PruningEvent(e.step, e.per_module * n, e.per_module, e.per_module) for e in events]
        # Drop events that remove nothing (e.g. a cubic ramp whose first steps round to the start).
        kept, previous = [], (initial, r0)
        for event in events:
            if (event.total, event.cap) != previous:
                kept.append(event)
                previous = (event.total, event.cap)
        return cls(events=tuple(kept), num_modules=n, r0=r0, final_total=final_total)

    def event_at(self, step: int) -> PruningEvent | None:
        for event in self.events:
            if event.step == step:
                return event
        return None

    @property
    def last_step(self) -> int:
        return self.events[-1].step if self.events else -1
