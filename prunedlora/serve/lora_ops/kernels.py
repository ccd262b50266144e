"""Grouped LoRA kernels in plain torch: one matmul per adapter slot in the batch, at its live rank.

vLLM's CPU ops gather every token's padded slot weights (``weights[indices]``, a (tokens, out, slot
rank) copy per projection) and einsum over them; the cost grows with tokens x slot rank, and a token
without an adapter (index -1) silently gets the last slot (see ``serve/vllm_fixes.py``). Here the
tokens are grouped by slot once per batch (:func:`group_by_slot`), and each group is one matmul with
its slot's weights sliced to the slot's live rank (``weights``); tokens of index -1 are in no group,
so their outputs are untouched, and a slot with nothing live for a module costs nothing there.
The only Python work is per slot present in the batch, never per token.

Semantics follow vLLM's ops (``vllm/lora/ops/torch_ops/lora_ops.py``, vLLM 0.32), except for the
dtype an expand computes in: a shrink computes in its output's dtype (vLLM's float32 buffer), an
expand in float32 whatever its output's dtype, rounded once into a bf16 output (vLLM computes it in
bf16: slower on the CPU, see :func:`_accumulator`, and rounded per product). Outputs equal vLLM's up
to float rounding, except that rows of index -1 are zero after a shrink and untouched by an expand,
as vLLM's GPU kernels and its CPU ops with ``vllm_fixes`` have it. The six functions at the end have
vLLM's op signatures, as drop-ins.

Several adapters in one batch: :func:`batch_layout` lays their tokens out as a (slots, tokens per
slot) grid, and ``batched_*`` compute every slot at once with ``torch.bmm`` on the slots' weights
stacked and zero-padded to the largest rank among them (``weights.stack_slots``): a fixed number of
calls per layer however many adapters the batch holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunedlora.serve.lora_ops.weights import PackedSlot, SlotWeights, StackedSlots

Rows = slice | torch.Tensor


@dataclass(frozen=True)
class SlotGroup:
    """The tokens of one adapter slot: a slice where they are contiguous (no copy), else their indices."""

    slot: int
    rows: Rows


def group_by_slot(indices: torch.Tensor) -> tuple[SlotGroup, ...]:
    """Tokens grouped by their slot index; index -1 (no adapter) is left out."""
    if indices.numel() == 0:
        return ()
    groups = []
    for slot in torch.unique(indices).tolist():
        if slot < 0:
            continue
        rows = (indices == slot).nonzero().flatten()
        first, last = int(rows[0]), int(rows[-1])
        contiguous = last - first + 1 == rows.numel()
        groups.append(SlotGroup(slot, slice(first, last + 1) if contiguous else rows))
    return tuple(groups)


def _take(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """``t[rows]``, and ``t`` itself where the rows are all of it (one adapter for the whole batch, the
    common case at decode): a view costs a few microseconds, paid several times per layer per step."""
    if isinstance(rows, slice) and rows.start == 0 and rows.stop == t.shape[0]:
        return t
    return t[rows]


def _write(out: torch.Tensor, rows: Rows, cols: slice, value: torch.Tensor) -> None:
    if isinstance(rows, slice):
        out[rows, cols].copy_(value)
    else:
        out[rows, cols] = value


def _add_product(out: torch.Tensor, rows: Rows, cols: slice, z: torch.Tensor, b_t: torch.Tensor) -> None:
    """``out[rows, cols] += z @ b_t``. Where the rows are contiguous (one adapter's tokens, the usual
    case) the product accumulates into ``out`` in place (``addmm_``): the output is read and written
    once, where a product then an add makes three passes over a (tokens, out) block. That block
    traffic, not the rank-sized arithmetic, is most of a LoRA expand's cost at decode batch sizes."""
    if isinstance(rows, slice):
        _take(out, rows).narrow(1, cols.start, cols.stop - cols.start).addmm_(z, b_t)
    else:
        out[rows, cols] += z @ b_t


def shrink(
    out: torch.Tensor,
    x: torch.Tensor,
    slot_a: Sequence[torch.Tensor | None],
    width: int,
    scale: float,
    groups: Sequence[SlotGroup],
) -> None:
    """``out[t, :width] = scale * A_s x_t`` for each token t of slot s; every other entry of
    ``out[:, :width]`` is zero (``slot_a[s]``: A's live rows (rank, in), None for nothing live).
    Like :func:`linear`, kept to views and in-place products: it runs on every row-parallel layer."""
    out.narrow(1, 0, width).zero_()
    for group in groups:
        a = slot_a[group.slot]
        if a is None:
            continue
        xs = _take(x, group.rows)
        if xs.dtype != out.dtype:
            xs = xs.to(out.dtype)
        a_t = (a if a.dtype == out.dtype else a.to(out.dtype)).t()
        if isinstance(group.rows, slice):  # onto the zeros just written: the scaled product, in place
            _take(out, group.rows).narrow(1, 0, a_t.shape[1]).addmm_(xs, a_t, alpha=scale)
        else:
            z = xs @ a_t
            out[group.rows, : a_t.shape[1]] = z if scale == 1.0 else z * scale


def _accumulator(out: torch.Tensor) -> torch.Tensor:
    """Where the products accumulate: ``out`` itself in float32; a float32 copy of it otherwise.

    In bfloat16 (or float16) every matmul or add on the output pays a fixed ~20 us on the CPU (a bf16
    GEMM goes through oneDNN, whose per-call set-up, not its arithmetic, dominates at decode shapes;
    aten's bf16 element-wise ops run at a third of float32's speed), once per adapter, per slice, per
    layer, per step, whatever the rank. So a layer's every slice and every adapter accumulate in one
    float32 copy of the output (MKL's float32 GEMMs, a few microseconds, scaling with the rank) and
    :func:`_store` writes it back once: two passes over the output block a layer instead of one bf16
    GEMM per product. bf16 -> float32 -> bf16 is exact, so rows no adapter touches are unchanged."""
    return out if out.dtype == torch.float32 else out.float()


def _store(out: torch.Tensor, acc: torch.Tensor) -> None:
    if acc is not out:
        out.copy_(acc)


def expand(
    out: torch.Tensor,
    z: torch.Tensor,
    slot_b: Sequence[torch.Tensor | None],
    groups: Sequence[SlotGroup],
    offset: int,
    size: int,
    add_inputs: bool = True,
) -> None:
    """``out[t, offset:offset+size] (+)= B_s[:size] z_t[:rank]`` for each token t of slot s; rows of
    tokens without an adapter are untouched (``slot_b[s]``: B's live columns (out, rank), None for
    nothing live: such a slot adds nothing, or writes its zeros when ``add_inputs`` is off).

    The products are computed in float32 whatever ``out``'s dtype (see :func:`_accumulator`), so ``z``
    and ``slot_b`` are best given in float32; where ``out`` is bf16 it is rounded once, at the end."""
    if not any(slot_b[g.slot] is not None or not add_inputs for g in groups):
        return
    block = out.narrow(1, offset, size)
    acc = _accumulator(block)
    for group in groups:
        rows, b = group.rows, slot_b[group.slot]
        if b is None:
            if not add_inputs:
                acc[rows] = 0
            continue
        zg = _take(z, rows).narrow(1, 0, b.shape[1])
        if zg.dtype != acc.dtype:
            zg = zg.to(acc.dtype)
        b_t = (b if b.shape[0] == size else b[:size]).t()
        if b_t.dtype != acc.dtype:
            b_t = b_t.to(acc.dtype)
        if add_inputs:
            _add_product(acc, rows, slice(0, size), zg, b_t)
        else:
            _write(acc, rows, slice(0, size), zg @ b_t)
    _store(block, acc)


def linear(
    out: torch.Tensor,
    x: torch.Tensor,
    slots: Sequence[PackedSlot | None],
    scale: float,
    output_slices: Sequence[int],
    groups: Sequence[SlotGroup],
    shrink_dtype: torch.dtype = torch.float32,
    batch: BatchLayout | None = None,
    stacked: StackedSlots | None = None,
) -> None:
    """``out[t, slice i] += B_s,i (scale * A_s,i x_t)`` for every slice of a (packed) layer, per slot:
    one gather of the slot's inputs and one shrink matmul across all slices, then one expand matmul
    per live slice, every product in float32 (``shrink_dtype``, as vLLM's CPU buffer) accumulating
    into one float32 copy of a bf16 output written back once (:func:`_accumulator`).

    With ``batch`` and ``stacked`` (several adapters in the batch, see :func:`batched_linear`) the
    slots are computed together, in a number of calls that does not grow with the adapters.

    vLLM calls this once per LoRA layer per forward step (about 120 times a step for a 30-layer
    model), and at decode batch sizes the matmuls take microseconds, so the loop is kept to views
    (``narrow``) and the operands :class:`PackedSlot` prepared once: per-call Python work is a fixed
    cost every adapter pays whatever its rank, which would hide the rank saving."""
    if not any(slots[g.slot] is not None for g in groups):
        return
    acc = _accumulator(out)
    if batch is not None and stacked is not None:
        batched_linear(acc, x, stacked, scale, batch)
        _store(out, acc)
        return
    offsets, offset = [], 0
    for size in output_slices:
        offsets.append(offset)
        offset += size
    for group in groups:
        slot = slots[group.slot]
        if slot is None:
            continue
        rows = group.rows
        xs = _take(x, rows)
        z = torch.mm(xs if xs.dtype == shrink_dtype else xs.to(shrink_dtype), slot.a_t)
        if scale != 1.0:
            z.mul_(scale)
        if z.dtype != acc.dtype:
            z = z.to(acc.dtype)
        contiguous = isinstance(rows, slice)
        target = _take(acc, rows) if contiguous else acc
        for i, lo, rank, b_t in slot.parts:
            size = output_slices[i]
            if b_t.shape[1] != size:
                b_t = b_t[:, :size]
            if b_t.dtype != acc.dtype:
                b_t = b_t.to(acc.dtype)
            if contiguous:  # accumulate in place, see _add_product
                target.narrow(1, offsets[i], size).addmm_(z.narrow(1, lo, rank), b_t)
            else:
                acc[rows, offsets[i] : offsets[i] + size] += z.narrow(1, lo, rank) @ b_t
    _store(out, acc)


@dataclass(frozen=True)
class BatchLayout:
    """The tokens of several slots laid out as a (groups, tokens per group) grid for batched GEMMs.

    ``index[g * per_group + j]`` is the row of group g's j-th token; groups with fewer tokens repeat
    their last row, and ``keep`` (None where no group is short) says which grid cells are real."""

    slots: tuple[int, ...]
    per_group: int
    index: torch.Tensor
    keep: torch.Tensor | None
    rows: torch.Tensor


def batch_layout(groups: Sequence[SlotGroup], max_padding: float = 2.0) -> BatchLayout | None:
    """The grid of :class:`BatchLayout` for ``groups``, or None where batching does not pay: fewer than
    two groups, or groups so uneven (prefill: one long prompt beside short ones) that the padded grid
    would exceed ``max_padding`` times the tokens (the per-slot loop then runs big contiguous GEMMs)."""
    if len(groups) < 2:
        return None
    members = []
    for g in groups:
        rows = g.rows
        members.append(torch.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows)
    per_group = max(int(m.numel()) for m in members)
    tokens = sum(int(m.numel()) for m in members)
    if per_group * len(groups) > max_padding * tokens:
        return None
    padded, keep = [], []
    for m in members:
        short = per_group - int(m.numel())
        padded.append(torch.cat([m, m[-1:].expand(short)]) if short else m)
        keep.append(torch.cat([torch.ones(m.numel(), dtype=torch.bool), torch.zeros(short, dtype=torch.bool)]))
    index = torch.cat(padded).long()
    mask = torch.cat(keep)
    keep_mask = None if bool(mask.all()) else mask
    rows = index if keep_mask is None else index[keep_mask]
    return BatchLayout(tuple(g.slot for g in groups), per_group, index, keep_mask, rows)


def batched_linear(acc: torch.Tensor, x: torch.Tensor, stacked: StackedSlots, scale: float, batch: BatchLayout) -> None:
    """``acc[t, slice i] += B_s,i (scale * A_s,i x_t)`` for every token of the grid, every slot at once:
    one gather of the inputs, one batched shrink, one batched expand and one scatter-add per slice,
    however many adapters the batch holds (the ranks padded to the largest among them)."""
    groups, per_group = len(batch.slots), batch.per_group
    xs = x.index_select(0, batch.index)
    if xs.dtype != stacked.a_t.dtype:
        xs = xs.to(stacked.a_t.dtype)
    z = torch.bmm(xs.view(groups, per_group, -1), stacked.a_t)
    if scale != 1.0:
        z.mul_(scale)
    for i, b_t in enumerate(stacked.b_t):
        if b_t is None:
            continue
        lo, hi = stacked.bounds[i]
        y = torch.bmm(z[:, :, lo:hi], b_t).view(groups * per_group, -1)
        if batch.keep is not None:
            y = y[batch.keep]
        acc.narrow(1, stacked.offsets[i], stacked.sizes[i]).index_add_(0, batch.rows, y)


def batched_shrink(
    out: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, width: int, scale: float, batch: BatchLayout
) -> None:
    """:func:`shrink` for every slot of ``batch`` at once: ``a_t`` (groups, in, R) from
    :func:`~prunedlora.serve.lora_ops.weights.stack_a`; every other entry of ``out[:, :width]`` is zero."""
    out.narrow(1, 0, width).zero_()
    xs = x.index_select(0, batch.index)
    if xs.dtype != a_t.dtype:
        xs = xs.to(a_t.dtype)
    z = torch.bmm(xs.view(len(batch.slots), batch.per_group, -1), a_t).view(-1, a_t.shape[-1])
    if batch.keep is not None:
        z = z[batch.keep]
    if scale != 1.0:
        z.mul_(scale)
    out.narrow(1, 0, a_t.shape[-1]).index_copy_(0, batch.rows, z.to(out.dtype))


def batched_expand(out: torch.Tensor, z: torch.Tensor, b_t: torch.Tensor, offset: int, batch: BatchLayout) -> None:
    """:func:`expand` (adding) for every slot of ``batch`` at once: ``b_t`` (groups, R, size) from
    :func:`~prunedlora.serve.lora_ops.weights.stack_b`, products in float32 (:func:`_accumulator`)."""
    block = out.narrow(1, offset, b_t.shape[-1])
    acc = _accumulator(block)
    zs = z.index_select(0, batch.index).narrow(1, 0, b_t.shape[1])
    if zs.dtype != b_t.dtype:
        zs = zs.to(b_t.dtype)
    y = torch.bmm(zs.view(len(batch.slots), batch.per_group, -1), b_t).view(-1, b_t.shape[-1])
    if batch.keep is not None:
        y = y[batch.keep]
    acc.index_add_(0, batch.rows, y)
    _store(block, acc)


# vLLM's op signatures (vllm/lora/ops/torch_ops/lora_ops.py), as drop-ins. Each call groups its
# indices and reads the live ranks (cached per weight tensor); the punica wrapper groups once a batch.
_WEIGHTS = SlotWeights()


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    slot_a = _WEIGHTS.rows(lora_a_weights, output_tensor.dtype)
    groups = group_by_slot(lora_indices_tensor)
    shrink(output_tensor, inputs, slot_a, lora_a_weights.shape[-2], scaling, groups)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    size = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    slot_b = _WEIGHTS.cols(lora_b_weights, torch.float32)
    expand(output_tensor, inputs, slot_b, group_by_slot(lora_indices_tensor), 0, size, add_inputs)


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs=True
):
    slot_b = _WEIGHTS.cols(lora_b_weights, torch.float32)
    groups = group_by_slot(lora_indices_tensor)
    expand(output_tensor, inputs, slot_b, groups, slice_offset, slice_size, add_inputs)


def _per_token(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(
    inputs,
    lora_a_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    scaling,
):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(
    inputs,
    lora_b_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    add_inputs=False,
):
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    slice_offset,
    slice_size,
    add_inputs=False,
):
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs)
