"""The pruning residual as a LoRA: its truncated SVD folded into the first components of a PEFT LoRA.

Pruning leaves E = W0 - M*W0 (the weights it removed). By Eckart-Young, the rank-r truncation of
E's SVD, E_r = U_r S_r V_r^T, is the best rank-r repair in Frobenius norm, and what it misses is the
tail of the spectrum:

    ||E - E_r||^2 = sum_{i>r} s_i^2 <= (1 - r/min(d, k)) ||E||^2,

because the r largest of min(d, k) squared singular values hold at least their share r/min(d, k) of
the total ||E||^2 = sum_i s_i^2.

PEFT computes W x + s * B A x with s = lora_alpha / rank (or / sqrt(rank) with rsLoRA). Setting the
first r_res components to B = U_r sqrt(S_r) / sqrt(s) and A = sqrt(S_r) V_r^T / sqrt(s) makes
s * B A = E_r exactly, with both factors of equal norm (balanced, as gradient descent keeps them).
The remaining components keep PEFT's own initialisation (A random, B zero), so at step 0 the model is
M*W0 + E_r and the task part starts from nothing, as a plain LoRA does.

Whitened fit (``residual_fit: whitened``, as SVD-LLM fits a weight's own truncation): what the model
feels is not ||E - E_r|| but the output error ||(E - E_r) X^T|| over the inputs X it sees. With the
calibration Gram matrix C = X^T X + delta I = L L^T (Cholesky; delta a small multiple of C's mean
diagonal, so a feature never seen is still weighed), ||(E - E_r) X^T||^2 <= ||(E - E_r) L||^2, and the
rank-r minimiser of the right side is E_r = (E L)_r L^-1, again by Eckart-Young. Its factors are
B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T L^-1 from the SVD of E L, and the error and the bound above hold
in that norm. On SmolLM2-135M at 50% magnitude sparsity it halves the perplexity E_32 leaves
(docs/results.md); on a Wanda mask, already chosen by ||X_j||, it does not help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prunedlora.modelfacts import PEFT_PREFIX
from prunedlora.salr.errors import SalrError


@dataclass
class ResidualFactors:
    """E_r = B @ A (B: [out, r], A: [r, in]) and how much of ||E||^2 it misses."""

    B: torch.Tensor
    A: torch.Tensor
    error_sq: float  # ||E - E_r||_F^2
    total_sq: float  # ||E||_F^2

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def relative_error(self) -> float:
        """||E - E_r|| / ||E|| (0 for an empty residual)."""
        return math.sqrt(self.error_sq / self.total_sq) if self.total_sq > 0 else 0.0


def error_bound_sq(total_sq: float, rank: int, shape: tuple[int, int]) -> float:
    """The Eckart-Young guarantee (1 - r/min(d, k)) ||E||^2 for a rank-r truncation."""
    return max(0.0, 1.0 - rank / min(shape)) * total_sq


def residual_factors(residual: torch.Tensor, rank: int) -> ResidualFactors:
    """The rank-``rank`` truncated SVD of ``residual`` as balanced factors B = U sqrt(S), A = sqrt(S) V^T.

    Computed in float64 (exact to well below the weights' own precision), returned in float32 or the
    residual's wider dtype (a LoRA trains in float32 even over a bfloat16 base, as PEFT keeps it); the
    error is the spectrum's tail, sum_{i>r} s_i^2.
    """
    dtype = torch.promote_types(residual.dtype, torch.float32)
    if residual.ndim != 2:
        raise SalrError(f"a residual must be a 2-D weight, got shape {tuple(residual.shape)}")
    if not 0 <= rank <= min(residual.shape):
        raise SalrError(f"residual rank {rank} does not fit a {residual.shape[0]}x{residual.shape[1]} weight")
    if rank == 0:  # nothing to repair with: the whole residual is the error
        total = float(residual.double().square().sum())
        empty = torch.zeros((residual.shape[0], 0), dtype=dtype), torch.zeros((0, residual.shape[1]), dtype=dtype)
        return ResidualFactors(B=empty[0], A=empty[1], error_sq=total, total_sq=total)
    U, S, Vh = torch.linalg.svd(residual.double(), full_matrices=False)
    root = S[:rank].sqrt()
    B = (U[:, :rank] * root).to(dtype)
    A = (root.unsqueeze(1) * Vh[:rank]).to(dtype)
    return ResidualFactors(B=B, A=A, error_sq=float((S[rank:] ** 2).sum()), total_sq=float((S**2).sum()))


WHITENING_DAMPING = 0.01  # delta as a fraction of the Gram matrix's mean diagonal (SparseGPT's percdamp)


def whitened_residual_factors(
    residual: torch.Tensor, gram: torch.Tensor, rank: int, damping: float = WHITENING_DAMPING
) -> ResidualFactors:
    """The rank-``rank`` E_r minimising ||(E - E_r) L|| with L L^T = ``gram`` + damping (module docstring).

    ``gram`` is the (in x in) X^T X of the module's calibration inputs. ``error_sq`` and ``total_sq``
    are measured in the same norm, ||(E - E_r) L||^2 and ||E L||^2, so ``relative_error`` is the share of
    the residual's output the repair misses.
    """
    if residual.ndim != 2 or gram.shape != (residual.shape[1], residual.shape[1]):
        raise SalrError(
            f"a whitened fit needs a 2-D residual and its (in x in) input Gram matrix, got shapes "
            f"{tuple(residual.shape)} and {tuple(gram.shape)}"
        )
    if not 0 <= rank <= min(residual.shape):
        raise SalrError(f"residual rank {rank} does not fit a {residual.shape[0]}x{residual.shape[1]} weight")
    gram = gram.double()
    scale = float(gram.diagonal().mean())
    damped = gram + damping * (scale if scale > 0 else 1.0) * torch.eye(gram.shape[0], dtype=torch.float64)
    lower, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        raise SalrError("the calibration Gram matrix is not positive definite even after damping")
    dtype = torch.promote_types(residual.dtype, torch.float32)
    U, S, Vh = torch.linalg.svd(residual.double() @ lower, full_matrices=False)
    root = S[:rank].sqrt()
    B = U[:, :rank] * root
    if rank:  # A = sqrt(S_r) V_r^T L^-1, i.e. the solution of A L = sqrt(S_r) V_r^T
        A = torch.linalg.solve_triangular(lower, root.unsqueeze(1) * Vh[:rank], upper=False, left=False)
    else:
        A = torch.zeros((0, residual.shape[1]), dtype=torch.float64)
    return ResidualFactors(
        B=B.to(dtype), A=A.to(dtype), error_sq=float((S[rank:] ** 2).sum()), total_sq=float((S**2).sum())
    )


def lora_layers(peft_model, adapter_name: str = "default") -> dict[str, torch.nn.Module]:
    """Base module path (``model.layers.0.self_attn.q_proj``) -> PEFT LoRA layer holding ``adapter_name``."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            layers[name.removeprefix(PEFT_PREFIX)] = module
    return layers


@torch.no_grad()
def fold_residual(peft_model, factors: dict[str, ResidualFactors], adapter_name: str = "default") -> None:
    """Write each module's residual factors into the first components of its LoRA, divided by sqrt of
    PEFT's scaling on each side so that scaling * B @ A = E_r; the other components are left as PEFT
    initialised them."""
    layers = lora_layers(peft_model, adapter_name)
    missing = sorted(set(factors) - set(layers))
    if missing:
        raise SalrError(f"the LoRA has no layer for {len(missing)} residual module(s), e.g. {missing[0]}")
    for name, f in factors.items():
        layer = layers[name]
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if f.rank > A.shape[0]:
            raise SalrError(f"{name}: residual rank {f.rank} exceeds the LoRA rank {A.shape[0]}")
        root_scale = math.sqrt(layer.scaling[adapter_name])
        A[: f.rank] = (f.A / root_scale).to(A.dtype)
        B[:, : f.rank] = (f.B / root_scale).to(B.dtype)


class ResidualDamping:
    """Scales the optimizer's update of the first ``residual_rank`` components of every LoRA layer by ``scale``.

    ``scale`` 0 freezes them: a gradient hook zeroes their gradients, so Adam's moments for them stay
    zero and its update is zero; but decoupled weight decay (AdamW) would still shrink them, so
    ``restore()`` after each step writes the saved values back. ``scale`` in (0, 1) trains them at that
    fraction of the task components' learning rate: the components and the task part are slices of
    the same ``lora_A`` / ``lora_B`` tensors, which an optimizer's parameter groups cannot tell apart,
    so ``snapshot()`` saves them before each step and ``restore()`` writes back
    ``saved + scale * (stepped - saved)``. For AdamW that is exactly its step at ``scale`` x the
    learning rate (the update, weight decay included, is linear in the learning rate; the moments
    see the true gradients). Why: a residual trained at the task's rate is overwritten by a short task
    (on SST-2 its general perplexity ends above the sparse base's), a frozen one leaves only the
    task rank to learn with. With ``optimizer`` both run as its step hooks; ``remove()`` undoes them.
    """

    def __init__(
        self, peft_model, residual_rank: int, optimizer=None, adapter_name: str = "default", scale: float = 0.0
    ):
        if not 0.0 <= scale < 1.0:
            raise SalrError(f"a residual's update scale must be in [0, 1) (1 is plain training), got {scale!r}")
        self.residual_rank = residual_rank
        self.scale = float(scale)
        self._handles = []
        self._rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # lora_A: the first rows
        self._columns: list[tuple[torch.Tensor, torch.Tensor]] = []  # lora_B: the first columns
        if residual_rank <= 0:
            return
        for layer in lora_layers(peft_model, adapter_name).values():
            A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if self.frozen:
                self._handles.append(A.register_hook(self._zero_rows))
                self._handles.append(B.register_hook(self._zero_columns))
            self._rows.append((A, A.detach()[:residual_rank].clone()))
            self._columns.append((B, B.detach()[:, :residual_rank].clone()))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: self.snapshot()))
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.restore()))

    @property
    def frozen(self) -> bool:
        return self.scale == 0.0

    def _zero_rows(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[: self.residual_rank] = 0
        return grad

    def _zero_columns(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:, : self.residual_rank] = 0
        return grad

    @torch.no_grad()
    def snapshot(self) -> None:
        """Save the components as they are before a step (frozen: the values saved at the start stay)."""
        if self.frozen:
            return
        for param, saved in self._rows:
            saved.copy_(param[: self.residual_rank])
        for param, saved in self._columns:
            saved.copy_(param[:, : self.residual_rank])

    @torch.no_grad()
    def restore(self) -> None:
        """After a step: the saved values (frozen), or the step scaled, saved + scale * (stepped - saved)."""
        r = self.residual_rank
        for param, saved in self._rows:
            param[:r] = saved if self.frozen else torch.lerp(saved, param[:r], self.scale)
        for param, saved in self._columns:
            param[:, :r] = saved if self.frozen else torch.lerp(saved, param[:, :r], self.scale)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
