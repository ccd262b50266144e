"""Each slot's live rank per module, and the per-slot weight slices the kernels multiply with.

vLLM keeps a module's adapters in two padded tensors per slice: ``lora_a_stacked`` (slots, 1,
max_lora_rank, in) and ``lora_b_stacked`` (slots, 1, out, max_lora_rank); an adapter of rank r fills
the first r rows of A and columns of B and leaves the rest zero, and a module the adapter lacks stays
all zero (vLLM's ``set_lora``/``reset_lora``).

The live rank is read from those padded tensors rather than recorded from the adapter's shapes when
vLLM loads it: every LoRA layer class writes its slot in its own way (packed qkv/gate_up slices, an
adapter's packed groups split across slices, tensor-parallel shards, fully sharded ranks), so the
padded tensor is the one place that holds the rank each slice really got, after all of that. The rule
is exact by construction: rank components past the live rank are zero, so dropping them changes
nothing (A's rows for a shrink, B's columns for an expand; for a shrink-then-expand a component
counts only where both are non-zero). An export with no zero components gets exactly its PEFT ranks.

Reading costs one pass over a tensor, so results are cached per tensor until vLLM writes it again:
in-place writes bump a tensor's version counter (``set_lora`` and ``reset_lora`` copy into the slot
tensors in place). Tensors created under ``torch.inference_mode`` keep no version counter; for them
the cache trusts a generation number that its owner bumps when the slots change (the punica wrapper
does so when vLLM's slot-to-adapter table changes), or recomputes on every call.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def _as_3d(stacked: torch.Tensor) -> torch.Tensor:
    """(slots, 1, rows, cols) or (slots, rows, cols) as (slots, rows, cols) (a view)."""
    return stacked.reshape(stacked.shape[0], stacked.shape[-2], stacked.shape[-1])


def _last_nonzero(mask: torch.Tensor) -> list[int]:
    """Per row of a (slots, rank) bool mask, 1 + the last True position (0 where none)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask * positions).amax(dim=1).tolist() if mask.shape[1] else [0] * mask.shape[0]


def live_ranks_a(lora_a: torch.Tensor) -> list[int]:
    """Per slot of a stacked A (slots, [1,] rank, in): 1 + the last row with a non-zero entry."""
    return _last_nonzero((_as_3d(lora_a) != 0).any(dim=-1))


def live_ranks_b(lora_b: torch.Tensor) -> list[int]:
    """Per slot of a stacked B (slots, [1,] out, rank): 1 + the last column with a non-zero entry."""
    return _last_nonzero((_as_3d(lora_b) != 0).any(dim=-2))


@dataclass(frozen=True)
class PackedSlot:
    """One slot of a (possibly packed) linear layer, ready for a shrink then an expand.

    ``a`` stacks every slice's live rows of A (sum of ranks, in), so the shrink of a packed qkv or
    gate_up layer is one matmul; ``b[i]`` is slice i's B (out_i, rank_i), reading columns
    ``bounds[i]`` of the shrink's result. A slice whose rank is 0 has ``b[i]`` None.
    """

    a: torch.Tensor
    b: tuple[torch.Tensor | None, ...]
    bounds: tuple[tuple[int, int], ...]
    a_t: torch.Tensor = field(init=False, repr=False, compare=False)
    parts: tuple[tuple[int, int, int, torch.Tensor], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # What the kernel's inner loop reads, worked out once per slot rather than on every call:
        # A transposed for the shrink, and per live slice (slice index, first column of the shrink's
        # result, rank, B transposed) for the expands.
        object.__setattr__(self, "a_t", self.a.t())
        slices = enumerate(zip(self.b, self.bounds))
        live = tuple((i, lo, hi - lo, b.t()) for i, (b, (lo, hi)) in slices if b is not None)
        object.__setattr__(self, "parts", live)


@dataclass
class _Entry:
    ref: tuple
    stamp: tuple
    value: object


class SlotWeights:
    """Per-slot slices of vLLM's stacked LoRA tensors, cached until the tensors change.

    Keys are the stacked tensors (or a layer's tuple of them) by identity; an entry is reused while
    the same objects have the same version counters (and the same :attr:`generation`). The entries
    hold views where the dtype already matches and converted copies of the live part otherwise.
    """

    def __init__(self, trust_generation: bool = False):
        self.generation = 0
        self.trust_generation = trust_generation
        self._entries: dict[tuple, _Entry] = {}

    def _stamp(self, tensors: Sequence[torch.Tensor]) -> tuple | None:
        # Asked before reading ``_version``: on an inference tensor that raises, and a raised and caught
        # RuntimeError costs ~17 us, paid on every LoRA layer of every forward step.
        if any(t.is_inference() for t in tensors):  # no version counter
            return (self.generation, None) if self.trust_generation else None
        return (self.generation, tuple(t._version for t in tensors))

    def _cached(self, key: tuple, objects: tuple, tensors: Sequence[torch.Tensor], build):
        stamp = self._stamp(tensors)
        entry = self._entries.get(key)
        if (
            stamp is not None
            and entry is not None
            and entry.stamp == stamp
            and all(r() is o for r, o in zip(entry.ref, objects))
        ):
            return entry.value
        value = build()
        if stamp is not None:
            self._entries[key] = _Entry(tuple(weakref.ref(o) for o in objects), stamp, value)
        return value

    def rows(self, lora_a: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Per slot, A's live rows (rank, in) in ``dtype``; None for a slot with nothing live."""

        def build():
            a3 = _as_3d(lora_a)
            return [a3[s, :r].to(dtype) if r else None for s, r in enumerate(live_ranks_a(lora_a))]

        return self._cached(("rows", id(lora_a), dtype), (lora_a,), (lora_a,), build)

    def cols(self, lora_b: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor | None]:
        """Per slot, B's live columns (out, rank) in ``dtype``; None for a slot with nothing live."""

        def build():
            b3 = _as_3d(lora_b)
            return [b3[s, :, :r].to(dtype) if r else None for s, r in enumerate(live_ranks_b(lora_b))]

        return self._cached(("cols", id(lora_b), dtype), (lora_b,), (lora_b,), build)

    def packed(
        self,
        lora_a: Sequence[torch.Tensor],
        lora_b: Sequence[torch.Tensor],
        a_dtype: torch.dtype,
        b_dtype: torch.dtype,
    ) -> list[PackedSlot | None]:
        """Per slot, a :class:`PackedSlot` over every slice of a layer; None where no slice is live.

        A slice's rank here is where both its A row and its B column are non-zero: the shrink's
        result is only ever read by this expand, so a component either side zeroes costs nothing.
        """
        a_list, b_list = list(lora_a), list(lora_b)

        def build():
            ranks = [[min(ra, rb) for ra, rb in zip(live_ranks_a(a), live_ranks_b(b))] for a, b in zip(a_list, b_list)]
            slots: list[PackedSlot | None] = []
            for s in range(a_list[0].shape[0]):
                rs = [ranks[i][s] for i in range(len(a_list))]
                if not any(rs):
                    slots.append(None)
                    continue
                rows, bs, bounds, start = [], [], [], 0
                for a, b, r in zip(a_list, b_list, rs):
                    rows.append(_as_3d(a)[s, :r])
                    bs.append(_as_3d(b)[s, :, :r].to(b_dtype) if r else None)
                    bounds.append((start, start + r))
                    start += r
                a_cat = rows[0].to(a_dtype) if len(rows) == 1 else torch.cat([x.to(a_dtype) for x in rows])
                slots.append(PackedSlot(a_cat, tuple(bs), tuple(bounds)))
            return slots

        objects = (*a_list, *b_list)
        key = ("packed", tuple(id(o) for o in objects), a_dtype, b_dtype)
        return self._cached(key, objects, objects, build)
