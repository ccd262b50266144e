"""Grouped LoRA kernels in plain torch: one matmul per adapter slot in the batch, at its live rank.

vLLM's CPU ops gather every token's padded slot weights (``weights[indices]``, a (tokens, out, slot
rank) copy per projection) and einsum over them; the cost grows with tokens x slot rank, and a token
without an adapter (index -1) silently gets the last slot (see ``serve/vllm_fixes.py``). Here the
tokens are grouped by slot once per batch (:func:`group_by_slot`), and each group is one matmul with
its slot's weights sliced to the slot's live rank (``weights``); tokens of index -1 are in no group,
so their outputs are untouched, and a slot with nothing live for a module costs nothing there.
The only Python work is per slot present in the batch, never per token.

Semantics follow vLLM's ops (``vllm/lora/ops/torch_ops/lora_ops.py``, vLLM 0.32), including the
dtypes they compute in: a shrink computes in its output's dtype, an expand in its output's dtype.
Outputs equal vLLM's up to float rounding (different summation order), except that rows of index -1
are zero after a shrink and untouched by an expand, as vLLM's GPU kernels and its CPU ops with
``vllm_fixes`` have it. The six functions at the end have vLLM's op signatures, as drop-ins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunedlora.serve.lora_ops.weights import PackedSlot, SlotWeights

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
    nothing live: such a slot adds nothing, or writes its zeros when ``add_inputs`` is off)."""
    for group in groups:
        rows, b = group.rows, slot_b[group.slot]
        if b is None:
            if not add_inputs:
                out[rows, offset : offset + size] = 0
            continue
        zg = _take(z, rows).narrow(1, 0, b.shape[1])
        if zg.dtype != out.dtype:
            zg = zg.to(out.dtype)
        b_t = (b if b.shape[0] == size else b[:size]).t()
        if b_t.dtype != out.dtype:
            b_t = b_t.to(out.dtype)
        if add_inputs:
            _add_product(out, rows, slice(offset, offset + size), zg, b_t)
        else:
            _write(out, rows, slice(offset, offset + size), zg @ b_t)


def linear(
    out: torch.Tensor,
    x: torch.Tensor,
    slots: Sequence[PackedSlot | None],
    scale: float,
    output_slices: Sequence[int],
    groups: Sequence[SlotGroup],
    shrink_dtype: torch.dtype = torch.float32,
) -> None:
    """``out[t, slice i] += B_s,i (scale * A_s,i x_t)`` for every slice of a (packed) layer, per slot:
    one gather of the slot's inputs and one shrink matmul across all slices, then one expand matmul
    per live slice. The shrink computes in ``shrink_dtype`` (float32, as vLLM's CPU buffer) and the
    expand in ``out``'s dtype, as vLLM's ops do.

    vLLM calls this once per LoRA layer per forward step (about 120 times a step for a 30-layer
    model), and at decode batch sizes the matmuls take tens of microseconds, so the loop is kept to
    views (``narrow``) and the operands :class:`PackedSlot` prepared once: per-call Python work is a
    fixed cost every adapter pays whatever its rank, which would hide the rank saving."""
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
        if z.dtype != out.dtype:
            z = z.to(out.dtype)
        contiguous = isinstance(rows, slice)
        target = _take(out, rows) if contiguous else out
        for i, lo, rank, b_t in slot.parts:
            size = output_slices[i]
            if b_t.shape[1] != size:
                b_t = b_t[:, :size]
            if contiguous:  # accumulate in place, see _add_product
                target.narrow(1, offsets[i], size).addmm_(z.narrow(1, lo, rank), b_t)
            else:
                out[rows, offsets[i] : offsets[i] + size] += z.narrow(1, lo, rank) @ b_t


# vLLM's op signatures (vllm/lora/ops/torch_ops/lora_ops.py), as drop-ins. Each call groups its
# indices and reads the live ranks (cached per weight tensor); the punica wrapper groups once a batch.
_WEIGHTS = SlotWeights()


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    slot_a = _WEIGHTS.rows(lora_a_weights, output_tensor.dtype)
    groups = group_by_slot(lora_indices_tensor)
    shrink(output_tensor, inputs, slot_a, lora_a_weights.shape[-2], scaling, groups)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    size = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    slot_b = _WEIGHTS.cols(lora_b_weights, output_tensor.dtype)
    expand(output_tensor, inputs, slot_b, group_by_slot(lora_indices_tensor), 0, size, add_inputs)


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs=True
):
    slot_b = _WEIGHTS.cols(lora_b_weights, output_tensor.dtype)
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
