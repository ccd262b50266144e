"""Schedules hit the target exactly; allocations obey their contracts."""

import pytest
import torch

from prunedlora.rank.allocation import allocate_global, allocate_uniform
from prunedlora.rank.config import PrunedLoraConfig
from prunedlora.rank.schedule import PruningSchedule


def _simulate(config, n, seed=0):
    """Run every event of the schedule with random scores; return per-event ranks."""
    gen = torch.Generator().manual_seed(seed)
    masks = {f"m{i}": torch.ones(config.r0, dtype=torch.bool) for i in range(n)}
    schedule = PruningSchedule.build(config, n)
    trace = []
    for event in schedule.events:
        # modules differ systematically so global allocation has something to find
        scores = {name: torch.rand(config.r0, generator=gen) * (i + 1) ** 2 for i, name in enumerate(masks)}
        if config.allocation == "uniform":
            decision = allocate_uniform(scores, masks, event.per_module)
        else:
            decision = allocate_global(
                scores, masks, event.total, config.min_rank, event.cap, config.max_rank, schedule.final_total
            )
        for name, idx in decision.items():
            assert masks[name][idx].all(), "a component may only be removed once"
            masks[name][idx] = False
        trace.append({name: int(m.sum()) for name, m in masks.items()})
    return schedule, trace


@pytest.mark.parametrize("schedule", ["cubic", "constant"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_schedules_hit_the_target_average_exactly(schedule, allocation):
    config = PrunedLoraConfig(
        r0=16,
        target_rank=4,
        schedule=schedule,
        allocation=allocation,
        prune_start_step=5,
        prune_end_step=45,
        prune_every=5,
    )
    _, trace = _simulate(config, n=7)
    final = trace[-1]
    assert sum(final.values()) == 4 * 7
    totals = [sum(t.values()) for t in trace]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)


def test_uniform_gives_equal_ranks_at_every_event():
    config = PrunedLoraConfig(
        r0=16, target_rank=5, allocation="uniform", prune_start_step=0, prune_end_step=30, prune_every=5
    )
    _, trace = _simulate(config, n=5)
    for ranks in trace:
        assert len(set(ranks.values())) == 1
    assert set(trace[-1].values()) == {5}


def test_global_gives_unequal_ranks_within_min_and_max():
    config = PrunedLoraConfig(
        r0=16, target_rank=6, min_rank=2, max_rank=10, prune_start_step=0, prune_end_step=40, prune_every=5
    )
    _, trace = _simulate(config, n=8)
    final = trace[-1]
    assert len(set(final.values())) > 1
    assert sum(final.values()) == 6 * 8
    assert all(2 <= r <= 10 for r in final.values())
    for ranks in trace:
        assert all(r >= 2 for r in ranks.values())


def test_global_fractional_target_and_total_budget():
    config = PrunedLoraConfig(
        r0=8, target_rank=None, total_rank_budget=13, min_rank=0, prune_start_step=0, prune_end_step=20, prune_every=5
    )
    _, trace = _simulate(config, n=4)
    assert sum(trace[-1].values()) == 13


def test_constant_schedule_is_k_every_n_steps():
    config = PrunedLoraConfig(
        r0=32,
        target_rank=8,
        schedule="constant",
        components_per_event=2,
        allocation="uniform",
        prune_start_step=10,
        prune_every=10,
    )
    schedule, trace = _simulate(config, n=3)
    assert [e.step for e in schedule.events] == list(range(10, 130, 10))
    assert [t["m0"] for t in trace] == list(range(30, 7, -2))


def test_constant_schedule_last_event_takes_exactly_the_rest():
    config = PrunedLoraConfig(
        r0=9,
        target_rank=4,
        schedule="constant",
        components_per_event=2,
        allocation="uniform",
        prune_start_step=0,
        prune_every=3,
    )
    schedule, trace = _simulate(config, n=2)
    assert [t["m0"] for t in trace] == [7, 5, 4]
    assert [e.step for e in schedule.events] == [0, 3, 6]


def test_cubic_removes_more_early_than_late():
    config = PrunedLoraConfig(r0=32, target_rank=8, prune_start_step=0, prune_end_step=90, prune_every=10)
    schedule = PruningSchedule.build(config, 10)
    removed = [a.total - b.total for a, b in zip(schedule.events, schedule.events[1:])]
    assert removed == sorted(removed, reverse=True)
    assert schedule.events[-1].step == 90 and schedule.events[-1].total == 80


def test_global_allocation_breaks_ties_deterministically():
    masks = {"a": torch.ones(4, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)}
    scores = {"a": torch.zeros(4), "b": torch.zeros(4)}
    first = allocate_global(scores, masks, total_keep=5, min_rank=0, cap=4)
    assert first == allocate_global(scores, masks, total_keep=5, min_rank=0, cap=4)
    assert first == {"a": [0, 1, 2]}
