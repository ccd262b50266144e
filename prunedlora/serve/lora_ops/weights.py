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


@dataclass(frozen=True)
class StackedSlots:
    """A layer's weights for the slots of a :class:`BatchLayout`, stacked for ``torch.bmm``.

    ``a_t`` (groups, in, sum of R_i): every slot's A transposed, slice i in columns ``bounds[i]`` of
    width R_i, the largest rank slice i has among these slots (zero-padded below it); ``b_t[i]``
    (groups, R_i, out_i): slice i's B transposed, zero rows past each slot's rank; None where no slot
    has slice i. Zero padding changes no result: it adds exact zeros."""

    a_t: torch.Tensor
    b_t: tuple[torch.Tensor | None, ...]
    bounds: tuple[tuple[int, int], ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def stack_slots(
    slots: Sequence[PackedSlot | None], layout_slots: Sequence[int], output_slices: Sequence[int]
) -> StackedSlots:
    """:class:`StackedSlots` of ``slots`` for the slots ``layout_slots`` (a slot with nothing live
    contributes zeros)."""
    present = [slots[s] for s in layout_slots]
    live = [p for p in present if p is not None]
    dtype = live[0].a_t.dtype
    width = live[0].a_t.shape[0]
    n = len(output_slices)
    ranks = [max((p.bounds[i][1] - p.bounds[i][0] for p in live), default=0) for i in range(n)]
    bounds, start = [], 0
    for r in ranks:
        bounds.append((start, start + r))
        start += r
    a_t = torch.zeros(len(present), width, start, dtype=dtype)
    b_t = [torch.zeros(len(present), r, size, dtype=dtype) if r else None for r, size in zip(ranks, output_slices)]
    for g, p in enumerate(present):
        if p is None:
            continue
        for i, lo, rank, part_b_t in p.parts:
            a_t[g, :, bounds[i][0] : bounds[i][0] + rank] = p.a_t[:, lo : lo + rank]
            b_t[i][g, :rank] = part_b_t[:, : output_slices[i]]
    offsets, offset = [], 0
    for size in output_slices:
        offsets.append(offset)
        offset += size
    return StackedSlots(a_t, tuple(b_t), tuple(bounds), tuple(offsets), tuple(output_slices))


def stack_a(slot_a: Sequence[torch.Tensor | None], slots: Sequence[int]) -> torch.Tensor | None:
    """Per slot of ``slots``, A's live rows transposed, stacked (groups, in, R) with R the largest rank
    among them, zero-padded; None where none of them has anything live."""
    present = [slot_a[s] for s in slots]
    live = [a for a in present if a is not None]
    if not live:
        return None
    rank = max(a.shape[0] for a in live)
    out = torch.zeros(len(present), live[0].shape[1], rank, dtype=live[0].dtype)
    for g, a in enumerate(present):
        if a is not None:
            out[g, :, : a.shape[0]] = a.t()
    return out


def stack_b(slot_b: Sequence[torch.Tensor | None], slots: Sequence[int], size: int) -> torch.Tensor | None:
    """Per slot of ``slots``, B's first ``size`` rows' live columns transposed, stacked (groups, R, size),
    zero-padded; None where none of them has anything live."""
    present = [slot_b[s] for s in slots]
    live = [b for b in present if b is not None]
    if not live:
        return None
    rank = max(b.shape[1] for b in live)
    out = torch.zeros(len(present), rank, size, dtype=live[0].dtype)
    for g, b in enumerate(present):
        if b is not None:
            out[g, : b.shape[1]] = b[:size].t()
    return out


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
        self._latest: dict[tuple, tuple] = {}  # per layer, the keys of its stacked entries, oldest first

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

    # How many batch compositions (sets of slots) a layer keeps stacked weights for: a decode batch's
    # composition changes only when a request of another adapter joins or leaves.
    stacked_per_layer = 4

    def _one_per_layer(self, layer: tuple, key: tuple, objects: tuple, build):
        """:meth:`_cached`, keeping at most :attr:`stacked_per_layer` entries per ``layer`` (the batch's
        slots change as requests come and go; only recent sets are worth their memory)."""
        recent = self._latest.setdefault(layer, ())
        if key in recent:
            recent = tuple(k for k in recent if k != key)
        elif len(recent) >= self.stacked_per_layer:
            self._entries.pop(recent[0], None)
            recent = recent[1:]
        self._latest[layer] = (*recent, key)
        return self._cached(key, objects, objects, build)

    def stacked(
        self,
        lora_a: Sequence[torch.Tensor],
        lora_b: Sequence[torch.Tensor],
        dtype: torch.dtype,
        slots: tuple[int, ...],
        output_slices: Sequence[int],
    ) -> StackedSlots | None:
        """A (packed) layer's :class:`StackedSlots` for ``slots``, None where none of them is live."""
        a_list, b_list = list(lora_a), list(lora_b)
        packed = self.packed(a_list, b_list, dtype, dtype)

        def build():
            if all(packed[s] is None for s in slots):
                return None
            return stack_slots(packed, slots, output_slices)

        objects = (*a_list, *b_list)
        layer = ("stacked", tuple(id(o) for o in objects), dtype)
        return self._one_per_layer(layer, (*layer, slots, tuple(output_slices)), objects, build)

    def stacked_a(self, lora_a: torch.Tensor, dtype: torch.dtype, slots: tuple[int, ...]) -> torch.Tensor | None:
        """:func:`stack_a` of A's live rows for ``slots``, cached."""
        rows = self.rows(lora_a, dtype)
        layer = ("stacked_a", id(lora_a), dtype)
        return self._one_per_layer(layer, (*layer, slots), (lora_a,), lambda: stack_a(rows, slots))

    def stacked_b(
        self, lora_b: torch.Tensor, dtype: torch.dtype, slots: tuple[int, ...], size: int
    ) -> torch.Tensor | None:
        """:func:`stack_b` of B's live columns for ``slots``, cached."""
        cols = self.cols(lora_b, dtype)
        layer = ("stacked_b", id(lora_b), dtype)
        return self._one_per_layer(layer, (*layer, slots, size), (lora_b,), lambda: stack_b(cols, slots, size))
