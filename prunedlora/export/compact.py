"""Tensor-level compaction: from one module's rank-r0 LoRA factors to its dense, scaling-free form.

Everything here works on plain tensors (no model, no files), so each rule is unit-testable on its
own. A LoRA module adds ``scaling * B @ A`` to its base layer; a component j is the pair (row j of A,
column j of B). Compaction keeps the live components in their original order and folds the scaling
into B, so the written module computes ``B' @ A'`` with scaling 1 in every loader: PEFT and vLLM 0.32
(which read ``rank_pattern``/``alpha_pattern``) and older vLLM releases (which ignore
``alpha_pattern`` and use ``lora_alpha / r``) then agree, because we write ``lora_alpha == r`` and
every pattern's alpha equal to its rank.

Arithmetic is done in float64 and cast back, so folding adds at most one rounding of the output
dtype. Half-precision inputs are written as float32: a scaling folded into a bf16/fp16 B would be
rounded to 8 or 11 bits, and the export would no longer compute what the training model computed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from prunedlora.export.errors import ExportError


@dataclass
class ModuleFactors:
    """A LoRA module as it is written: ``delta W = B @ A`` (scaling already folded into B)."""

    A: torch.Tensor  # (rank, in_features)
    B: torch.Tensor  # (out_features, rank)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def num_params(self) -> int:
        return self.A.numel() + self.B.numel()


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha/r, or alpha/sqrt(r) with rsLoRA (peft/tuners/lora/layer.py)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def pattern_key(module_name: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that matches exactly this module.

    PEFT and vLLM both match keys with ``re.match(rf"(.*\\.)?({key})$", name)``: an unanchored key
    ``layers.1.self_attn.q_proj`` would also match ``model.layers.1.self_attn.q_proj`` inside a
    wrapper, and the dots would match any character. ``^`` inside the group only matches when the
    optional prefix group is empty, and ``re.escape`` makes every character literal.
    """
    return "^" + re.escape(module_name)


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype compact factors are written in (see the module docstring)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_factors(name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2:
        raise ExportError(
            f"module {name}: lora_A and lora_B must be matrices, got shapes {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if A.shape[0] != B.shape[1]:
        raise ExportError(
            f"module {name}: lora_A has {A.shape[0]} rows but lora_B has {B.shape[1]} columns; the adapter file is inconsistent"
        )


def compact_module(
    name: str, A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor | None, scaling: float
) -> ModuleFactors | None:
    """Keep the components marked True (in order) and fold ``scaling`` into B; None when none is left.

    A component marked pruned must contribute nothing (its B column or its A row is exactly zero):
    otherwise the masks describe another adapter and dropping the component would change the model.
    """
    _check_factors(name, A, B)
    rank = A.shape[0]
    if keep is None:
        keep = torch.ones(rank, dtype=torch.bool)
    keep = keep.to(torch.bool).reshape(-1)
    if keep.numel() != rank:
        raise ExportError(
            f"masks do not match the adapter: module {name} has rank {rank} but its mask has {keep.numel()} entries"
        )
    pruned = (~keep).nonzero().flatten()
    if pruned.numel():
        live = (A[pruned].abs().amax(dim=1) > 0) & (B[:, pruned].abs().amax(dim=0) > 0)
        if bool(live.any()):
            bad = pruned[live][:5].tolist()
            raise ExportError(
                f"masks do not match the adapter: module {name} has component(s) {bad} marked pruned but their "
                "lora_A rows and lora_B columns are nonzero; export the masks that were saved with this adapter"
            )
    if not bool(keep.any()):
        return None
    dtype = output_dtype(A.dtype)
    A_kept = A[keep].to(torch.float64)
    B_kept = B[:, keep].to(torch.float64) * scaling
    return ModuleFactors(A=A_kept.to(dtype).contiguous(), B=B_kept.to(dtype).contiguous())


def adalora_module(
    name: str,
    A: torch.Tensor,
    E: torch.Tensor,
    B: torch.Tensor,
    keep: torch.Tensor | None,
    scaling: float,
    ranknum: float,
) -> ModuleFactors | None:
    """An AdaLoRA SVD triplet as plain LoRA factors: ``A' = E * A``, ``B' = B * scaling / ranknum``.

    PEFT's AdaLoRA computes ``x @ (A * E).T @ B.T * scaling / (ranknum + 1e-5)``
    (peft/tuners/adalora/layer.py); the same ``1e-5`` is used here so the conversion is exact.
    Triplets with E == 0 are masked in AdaLoRA and are dropped like pruned components.
    """
    _check_factors(name, A, B)
    if E.numel() != A.shape[0]:
        raise ExportError(f"module {name}: lora_E has {E.numel()} entries but lora_A has {A.shape[0]} rows")
    E = E.reshape(-1)
    if keep is None:
        keep = torch.ones(A.shape[0], dtype=torch.bool)
    keep = keep.to(torch.bool).reshape(-1)
    if keep.numel() != A.shape[0]:
        raise ExportError(
            f"module {name}: its AdaLoRA rank_pattern has {keep.numel()} entries but the tensors have rank {A.shape[0]}"
        )
    keep = keep & (E != 0)
    if not bool(keep.any()):
        return None
    dtype = output_dtype(A.dtype)
    A_new = A[keep].to(torch.float64) * E[keep].to(torch.float64)[:, None]
    B_new = B[:, keep].to(torch.float64) * (scaling / (ranknum + 1e-5))
    return ModuleFactors(A=A_new.to(dtype).contiguous(), B=B_new.to(dtype).contiguous())


def pad_module(factors: ModuleFactors, multiple: int) -> ModuleFactors:
    """Pad the rank up to a multiple with zero components: the same function, a kernel-friendly shape."""
    if multiple < 1:
        raise ExportError(f"--pad-to must be a positive integer, got {multiple}")
    extra = -factors.rank % multiple
    if extra == 0:
        return factors
    A = torch.cat([factors.A, factors.A.new_zeros(extra, factors.A.shape[1])], dim=0)
    B = torch.cat([factors.B, factors.B.new_zeros(factors.B.shape[0], extra)], dim=1)
    return ModuleFactors(A=A.contiguous(), B=B.contiguous())


def svd_truncate(factors: ModuleFactors, rank: int) -> tuple[ModuleFactors, float]:
    """The best rank-``rank`` approximation of ``B @ A`` and its relative Frobenius error.

    Works on the thin factors (QR of B and A^T, then the SVD of the small r x r core), so it never
    forms the out x in product. The singular values are split evenly (sqrt) between the new B and A.
    """
    if rank < 1:
        raise ExportError(f"cannot truncate to rank {rank}: the rank must be at least 1")
    if factors.rank <= rank:
        return factors, 0.0
    dtype = factors.A.dtype
    A = factors.A.to(torch.float64)
    B = factors.B.to(torch.float64)
    q_b, r_b = torch.linalg.qr(B)  # B = Qb Rb
    q_a, r_a = torch.linalg.qr(A.T)  # A^T = Qa Ra
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # B A = Qb (Rb Ra^T) Qa^T
    total = float(s.square().sum())
    error = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    root = s[:rank].sqrt()
    B_new = (q_b @ u[:, :rank]) * root
    A_new = root[:, None] * (vh[:rank] @ q_a.T)
    return ModuleFactors(A=A_new.to(dtype).contiguous(), B=B_new.to(dtype).contiguous()), error


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ExportError(f"{name} holds NaN or Inf values; the adapter is broken, re-export it from a good checkpoint")
