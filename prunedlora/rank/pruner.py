"""RankPruner: applies PrunedLoRA's decisions to PEFT LoRA layers during training.

It knows nothing of Trainer, files or vLLM: a custom loop, the Trainer callback and torchrun all
drive the same two calls around the optimizer step::

    loss.backward(); clip_grad_norm_(...)
    pruner.before_optimizer_step(step, optimizer)   # scores + prunes at event steps; masks gradients
    optimizer.step()
    pruner.after_optimizer_step()                   # keeps pruned weights exactly zero

A pruned component never comes back: its weights are zeroed, its gradients are masked before every
optimizer step and its optimizer state (Adam's moments) is zeroed at the event, so Adam's update for it
is 0 / (0 + eps) = 0 from then on. Decisions depend only on gradients (already all-reduced under DDP),
weights and all-reduced activation statistics, so every process takes the same one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunedlora.errors import PrunedLoraError
from prunedlora.rank.allocation import allocate_global, allocate_uniform
from prunedlora.rank.config import ConfigError, PrunedLoraConfig
from prunedlora.rank.criteria import (
    activation_scores,
    damped_inverse,
    damped_inverse_hessian,
    magnitude_scores,
    obs_fisher_scores,
    obs_input_scores,
    obs_scores,
    remove_components,
    sensitivity_scores,
    taylor_scores,
    update_sensitivity,
    update_taylor_ema,
)
from prunedlora.rank.schedule import PruningEvent, PruningSchedule

STATE_TENSORS_FILE = "prunedlora_pruner.safetensors"
STATE_HISTORY_FILE = "prunedlora_pruner.json"


@dataclass
class LoraModule:
    """One PEFT LoRA layer seen as the pruner needs it: B (out x r0) and A (r0 x in)."""

    name: str
    layer: nn.Module
    lora_a: nn.Parameter
    lora_b: nn.Parameter


def _unwrap(model: nn.Module) -> nn.Module:
    """The model whose module names are the base model's own (what rank_pattern keys match)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP and friends
        model = model.module
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, LoraModel):
        model = model.model
    return model


def find_lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, LoraModule]:
    """PEFT LoRA layers of ``model`` keyed by the base model's module name, in model order."""
    from peft.tuners.lora import LoraLayer

    found: dict[str, LoraModule] = {}
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {}):
            found[name] = LoraModule(
                name=name,
                layer=module,
                lora_a=module.lora_A[adapter_name].weight,
                lora_b=module.lora_B[adapter_name].weight,
            )
    return found


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class RankPruner:
    """Prunes rank components of a PEFT LoRA model on the schedule its config describes."""

    def __init__(self, model: nn.Module, config: PrunedLoraConfig, adapter_name: str = "default") -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.modules = find_lora_modules(model, adapter_name)
        if not self.modules:
            raise ConfigError(
                f"the model has no PEFT LoRA layers for adapter {adapter_name!r}; wrap it with "
                "peft.get_peft_model(model, LoraConfig(r=r0, ...)) first"
            )
        wrong = {n: m.lora_a.shape[0] for n, m in self.modules.items() if m.lora_a.shape[0] != config.r0}
        if wrong:
            raise ConfigError(
                f"LoRA layers must have rank r0={config.r0}; these do not: {dict(list(wrong.items())[:5])}"
            )
        self.schedule = PruningSchedule.build(config, len(self.modules))
        self.masks: dict[str, torch.Tensor] = {n: torch.ones(config.r0, dtype=torch.bool) for n in self.modules}
        self.history: list[dict[str, Any]] = []
        # Statistics gathered between events (zeroed at each event, saved with checkpoints):
        # "activation": sum of z^2 per component; "obs-input": sum of z z^T (z = A x, the LoRA input
        # to B); "obs-fisher": sums of G_B^T G_B / out and G_A G_A^T / in over optimizer steps.
        # "sensitivity" keeps AdaLoRA's per-entry moving averages instead, "taylor-ema" LoRAPrune's moving
        # average of each component's taylor score; neither is zeroed at events.
        self.activation_sq: dict[str, torch.Tensor] = {}
        self.input_cov: dict[str, torch.Tensor] = {}
        self.fisher_b: dict[str, torch.Tensor] = {}
        self.fisher_a: dict[str, torch.Tensor] = {}
        self.fisher_steps = 0
        self.importance_b: dict[str, torch.Tensor] = {}
        self.uncertainty_b: dict[str, torch.Tensor] = {}
        self.importance_a: dict[str, torch.Tensor] = {}
        self.uncertainty_a: dict[str, torch.Tensor] = {}
        self.taylor_ema: dict[str, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        if config.criterion in ("activation", "obs-input"):
            self._install_activation_hooks()
        if config.criterion == "obs-fisher":
            for name in self.modules:
                self.fisher_b[name] = torch.zeros(config.r0, config.r0, dtype=torch.float64)
                self.fisher_a[name] = torch.zeros(config.r0, config.r0, dtype=torch.float64)
        if config.criterion == "sensitivity":
            for name, module in self.modules.items():
                for stats, param in (
                    (self.importance_b, module.lora_b),
                    (self.uncertainty_b, module.lora_b),
                    (self.importance_a, module.lora_a),
                    (self.uncertainty_a, module.lora_a),
                ):
                    stats[name] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        if config.criterion == "taylor-ema":
            self.taylor_ema = {name: torch.zeros(config.r0, dtype=torch.float64) for name in self.modules}

    # -- what the training loop calls ---------------------------------------------------------
    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> PruningEvent | None:
        """Prune if ``step`` is an event, then mask the gradients. Call after backward and clipping."""
        event = self.schedule.event_at(step)
        if not self.finished:
            self.accumulate_gradient_statistics()
        if event is not None:
            self.prune(event, optimizer)
        self.mask_gradients()
        return event

    def after_optimizer_step(self) -> None:
        self.mask_weights()

    # -- state ----------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.masks.items()}

    @property
    def average_rank(self) -> float:
        return sum(self.ranks().values()) / len(self.masks)

    @property
    def finished(self) -> bool:
        return bool(self.history) and self.history[-1]["step"] >= self.schedule.last_step

    # -- the event ------------------------------------------------------------------------------
    def prune(self, event: PruningEvent, optimizer: torch.optim.Optimizer | None = None) -> dict[str, list[int]]:
        """Score every active component, choose what goes, remove it with recovery."""
        scores = self.score()
        if self.config.allocation == "uniform":
            decision = allocate_uniform(scores, self.masks, event.per_module)
        else:
            decision = allocate_global(
                scores,
                self.masks,
                total_keep=event.total,
                min_rank=self.config.min_rank,
                cap=event.cap,
                max_rank=self.config.max_rank,
                final_total=self.schedule.final_total,
            )
        with torch.no_grad():
            for name, removed in decision.items():
                self._remove(name, removed)
        if optimizer is not None:
            self.zero_optimizer_state(optimizer)
        for stats in (
            *self.activation_sq.values(),
            *self.input_cov.values(),
            *self.fisher_b.values(),
            *self.fisher_a.values(),
        ):
            stats.zero_()
        self.fisher_steps = 0
        ranks = self.ranks()
        self.history.append(
            {
                "step": event.step,
                "total_rank": sum(ranks.values()),
                "average_rank": sum(ranks.values()) / len(ranks),
                "ranks": ranks,
                "removed": {name: sorted(idx) for name, idx in decision.items()},
            }
        )
        return decision

    def score(self) -> dict[str, torch.Tensor]:
        """Score of every component (inactive ones get +inf so they are never chosen again)."""
        criterion = self.config.criterion
        if criterion in ("activation", "obs-input"):
            self._all_reduce_activations()
        scores: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            active = self.masks[name].nonzero().flatten()
            b = module.lora_b.detach()[:, active]
            a = module.lora_a.detach()[active, :]
            if criterion in ("obs-paper", "taylor"):
                grad_b, grad_a = self._grads(module, active)
                if criterion == "taylor":
                    active_scores = taylor_scores(b, a, grad_b, grad_a)
                else:
                    active_scores = obs_scores(b, a, grad_b, grad_a, self.config.hessian_damping)
            elif criterion == "obs-fisher":
                fisher_b, fisher_a = self._mean_fisher(name, active)
                active_scores = obs_fisher_scores(b, a, fisher_b, fisher_a, self.config.hessian_damping)
            elif criterion == "obs-input":
                cov = self.input_cov[name][active][:, active]
                active_scores = obs_input_scores(b, cov, self.config.hessian_damping, self.config.scaling)
            elif criterion == "sensitivity":
                active_scores = sensitivity_scores(
                    self.importance_b[name][:, active],
                    self.uncertainty_b[name][:, active],
                    self.importance_a[name][active, :],
                    self.uncertainty_a[name][active, :],
                )
            elif criterion == "taylor-ema":
                active_scores = self.taylor_ema[name][active]
            elif criterion == "magnitude":
                active_scores = magnitude_scores(b, a)
            else:
                active_scores = activation_scores(b, self.activation_sq[name][active])
            full = torch.full((self.config.r0,), float("inf"), dtype=torch.float64)
            full[active] = active_scores.cpu()
            scores[name] = full
        return scores

    def accumulate_gradient_statistics(self) -> None:
        """Fold this step's gradients into the criterion's statistics (obs-fisher, sensitivity, taylor-ema; else
        nothing)."""
        if not (self.fisher_b or self.importance_b or self.taylor_ema):
            return
        for module in self.modules.values():
            if module.lora_b.grad is None or module.lora_a.grad is None:
                return  # no backward this step (e.g. a custom loop calling us early): nothing to add
        if self.fisher_b:
            self._accumulate_fisher()
        with torch.no_grad():
            for name in self.importance_b:
                module = self.modules[name]
                grad_b, grad_a = module.lora_b.grad, module.lora_a.grad
                update_sensitivity(self.importance_b[name], self.uncertainty_b[name], module.lora_b, grad_b)
                update_sensitivity(self.importance_a[name], self.uncertainty_a[name], module.lora_a, grad_a)
            for name, average in self.taylor_ema.items():
                module = self.modules[name]  # a pruned component's weights are zero, so it adds nothing
                step_scores = taylor_scores(module.lora_b, module.lora_a, module.lora_b.grad, module.lora_a.grad)
                update_taylor_ema(average, step_scores.cpu())

    def _accumulate_fisher(self) -> None:
        """Add this step's ``G_B^T G_B / out`` and ``G_A G_A^T / in`` to the running sums (obs-fisher)."""
        with torch.no_grad():
            for name, module in self.modules.items():
                grad_b = module.lora_b.grad.detach().to(torch.float64)
                grad_a = module.lora_a.grad.detach().to(torch.float64)
                self.fisher_b[name] += (grad_b.T @ grad_b).cpu() / grad_b.shape[0]
                self.fisher_a[name] += (grad_a @ grad_a.T).cpu() / grad_a.shape[1]
        self.fisher_steps += 1

    def _mean_fisher(self, name: str, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = max(self.fisher_steps, 1)
        return (self.fisher_b[name][active][:, active] / steps, self.fisher_a[name][active][:, active] / steps)

    def _grads(self, module: LoraModule, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if module.lora_b.grad is None or module.lora_a.grad is None:
            raise PrunedLoraError(
                f"no gradient on {module.name} at a pruning event: call before_optimizer_step after "
                "backward() and before optimizer.zero_grad()"
            )
        return module.lora_b.grad.detach()[:, active], module.lora_a.grad.detach()[active, :]

    def _remove(self, name: str, removed: list[int]) -> None:
        module, mask = self.modules[name], self.masks[name]
        active = mask.nonzero().flatten()
        position = {int(j): p for p, j in enumerate(active.tolist())}
        order = [position[j] for j in removed]
        has_grads = module.lora_b.grad is not None and module.lora_a.grad is not None
        if self.config.recovery != "none" and has_grads:
            b, a = module.lora_b.data, module.lora_a.data
            grad_b, grad_a = self._grads(module, active)
            hinv_b, hinv_a = self._recovery_hessians(name, active, grad_b, grad_a)
            new_b = remove_components(b[:, active], grad_b, hinv_b, order, self.config.recovery).weight_rows
            b[:, active] = new_b.to(b.dtype)
            if hinv_a is not None:
                new_a_rows = remove_components(
                    a[active, :].T, grad_a.T, hinv_a, order, self.config.recovery
                ).weight_rows
                a[active, :] = new_a_rows.T.to(a.dtype)
        mask[removed] = False
        self._apply_mask(module, mask)

    def _recovery_hessians(
        self, name: str, active: torch.Tensor, grad_b: torch.Tensor, grad_a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inverse Hessians the recovery update uses: the criterion's own where it has one.

        obs-input re-fits B against its inputs (SparseGPT) and leaves A's other rows as they are, so
        it has no Hessian for A (None: A's removed rows are just zeroed).
        """
        damping = self.config.hessian_damping
        if self.config.criterion == "obs-fisher":
            fisher_b, fisher_a = self._mean_fisher(name, active)
            return damped_inverse(fisher_b, damping), damped_inverse(fisher_a, damping)
        if self.config.criterion == "obs-input":
            return damped_inverse(self.input_cov[name][active][:, active], damping), None
        return damped_inverse_hessian(grad_b, damping), damped_inverse_hessian(grad_a.T, damping)

    # -- keeping pruned components dead ---------------------------------------------------------
    @staticmethod
    def _apply_mask(module: LoraModule, mask: torch.Tensor) -> None:
        keep_b = mask.to(device=module.lora_b.device, dtype=module.lora_b.dtype)
        keep_a = mask.to(device=module.lora_a.device, dtype=module.lora_a.dtype)
        with torch.no_grad():
            module.lora_b.mul_(keep_b[None, :])
            module.lora_a.mul_(keep_a[:, None])
            if module.lora_b.grad is not None:
                module.lora_b.grad.mul_(keep_b[None, :])
            if module.lora_a.grad is not None:
                module.lora_a.grad.mul_(keep_a[:, None])

    def _pruned(self):
        for name, mask in self.masks.items():
            if not bool(mask.all()):
                yield self.modules[name], mask

    def mask_gradients(self) -> None:
        for module, mask in self._pruned():
            keep = mask.to(device=module.lora_b.device, dtype=module.lora_b.dtype)
            if module.lora_b.grad is not None:
                module.lora_b.grad.mul_(keep[None, :])
            if module.lora_a.grad is not None:
                module.lora_a.grad.mul_(keep.to(module.lora_a.dtype)[:, None])

    def mask_weights(self) -> None:
        with torch.no_grad():
            for module, mask in self._pruned():
                keep = mask.to(device=module.lora_b.device, dtype=module.lora_b.dtype)
                module.lora_b.mul_(keep[None, :])
                module.lora_a.mul_(keep.to(module.lora_a.dtype)[:, None])

    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero every per-parameter state tensor (Adam's exp_avg, exp_avg_sq, ...) of pruned entries."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        for module, mask in self._pruned():
            for param, shape_mask in (
                (module.lora_b, mask[None, :].expand_as(module.lora_b)),
                (module.lora_a, mask[:, None].expand_as(module.lora_a)),
            ):
                for value in inner.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.mul_(shape_mask.to(device=value.device, dtype=value.dtype))

    # -- statistics of B's inputs z = A x (criteria "activation" and "obs-input") ------------------
    def _install_activation_hooks(self) -> None:
        full = self.config.criterion == "obs-input"
        r0 = self.config.r0
        for name, module in self.modules.items():
            if full:
                self.input_cov[name] = torch.zeros(r0, r0, dtype=torch.float64)
            else:
                self.activation_sq[name] = torch.zeros(r0, dtype=torch.float64)
            lora_a = module.layer.lora_A[self.adapter_name]

            def hook(_mod, _inputs, output, name=name):
                if _mod.training:
                    flat = output.detach().reshape(-1, output.shape[-1]).to(torch.float64)
                    if full:
                        self.input_cov[name] += (flat.T @ flat).cpu()
                    else:
                        self.activation_sq[name] += flat.square().sum(dim=0).cpu()

            self._hooks.append(lora_a.register_forward_hook(hook))

    def _input_statistics(self) -> list[torch.Tensor]:
        return [*self.activation_sq.values(), *self.input_cov.values()]

    def _all_reduce_activations(self) -> None:
        if _world_size() > 1:
            import torch.distributed as dist

            for stats in self._input_statistics():
                dist.all_reduce(stats)

    def consolidate_statistics(self) -> None:
        """Gather the activation statistics on process 0 (call on every process, before saving).

        Each process accumulates its own inputs and the event sums them; a checkpoint written by
        process 0 must hold that sum, and the other processes restart from zero, so a resumed run
        sums to the same totals as an uninterrupted one.
        """
        if not self._input_statistics() or _world_size() <= 1:
            return
        import torch.distributed as dist

        self._all_reduce_activations()
        if dist.get_rank() != 0:
            for stats in self._input_statistics():
                stats.zero_()

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # -- checkpointing --------------------------------------------------------------------------
    # The per-module tensors a checkpoint holds, by kind (also their key prefix in the file).
    # Statistics from gradients, which DDP has all-reduced, so every process holds the same ones.
    _GRADIENT_KINDS = (
        "fisher_b",
        "fisher_a",
        "importance_b",
        "uncertainty_b",
        "importance_a",
        "uncertainty_a",
        "taylor_ema",
    )
    _STATE_KINDS = ("masks", "activation_sq", "input_cov", *_GRADIENT_KINDS)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            kind: {n: t.clone() for n, t in getattr(self, kind).items()} for kind in self._STATE_KINDS
        }
        state["fisher_steps"] = self.fisher_steps
        state["history"] = json.loads(json.dumps(self.history))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        if set(masks) != set(self.masks):
            missing, extra = sorted(set(self.masks) - set(masks)), sorted(set(masks) - set(self.masks))
            raise PrunedLoraError(f"pruner state does not match this model: missing {missing[:3]}, extra {extra[:3]}")
        self.masks = {n: masks[n].to(torch.bool).clone() for n in self.masks}
        for kind in ("activation_sq", "input_cov"):
            for name, stats in state.get(kind, {}).items():
                if name in getattr(self, kind):  # process 0 holds the sum (see consolidate_statistics)
                    getattr(self, kind)[name].copy_(stats if _rank() == 0 else torch.zeros_like(stats))
        for kind in self._GRADIENT_KINDS:
            for name, stats in state.get(kind, {}).items():
                if name in getattr(self, kind):
                    getattr(self, kind)[name].copy_(stats)
        self.fisher_steps = int(state.get("fisher_steps", 0))
        self.history = list(state["history"])
        for name, mask in self.masks.items():
            self._apply_mask(self.modules[name], mask)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        tensors = {f"mask::{n}": m for n, m in state["masks"].items()}
        for kind in self._STATE_KINDS[1:]:
            tensors.update({f"{kind}::{n}": s for n, s in state[kind].items()})
        save_file(tensors, str(directory / STATE_TENSORS_FILE))
        (directory / STATE_HISTORY_FILE).write_text(
            json.dumps({"history": state["history"], "fisher_steps": state["fisher_steps"]})
        )

    def load(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        tensors = load_file(str(directory / STATE_TENSORS_FILE))
        record = json.loads((directory / STATE_HISTORY_FILE).read_text())
        state: dict[str, Any] = {kind: {} for kind in self._STATE_KINDS}
        state.update(history=record["history"], fisher_steps=record.get("fisher_steps", 0))
        for key, value in tensors.items():
            kind, name = key.split("::", 1)
            state["masks" if kind == "mask" else kind][name] = value
        self.load_state_dict(state)

    @staticmethod
    def has_saved_state(directory: str | os.PathLike) -> bool:
        return (Path(directory) / STATE_TENSORS_FILE).is_file()
