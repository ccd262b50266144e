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
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunedlora.errors import PrunedLoraError
from prunedlora.rank.allocation import allocate_global, allocate_uniform
from prunedlora.rank.config import ConfigError, PrunedLoraConfig
from prunedlora.rank.criteria.base import Criterion
from prunedlora.rank.modules import LoraModule, active_grads, find_lora_modules, has_grads
from prunedlora.rank.obs import remove_components
from prunedlora.rank.schedule import PruningEvent, PruningSchedule

STATE_TENSORS_FILE = "prunedlora_pruner.safetensors"
STATE_HISTORY_FILE = "prunedlora_pruner.json"
__all__ = ["STATE_HISTORY_FILE", "STATE_TENSORS_FILE", "LoraModule", "RankPruner", "find_lora_modules"]


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
        # the criterion owns the statistics it scores from (hooks, per-step folds, their checkpoint state)
        self.criterion: Criterion = config.criterion_class()(self.modules, config, adapter_name)

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
        self.criterion.after_event()
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
        self.criterion.before_scoring()
        scores: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            active = self.masks[name].nonzero().flatten()
            full = torch.full((self.config.r0,), float("inf"), dtype=torch.float64)
            full[active] = self.criterion.score(name, module, active).cpu()
            scores[name] = full
        return scores

    def accumulate_gradient_statistics(self) -> None:
        """Fold this step's gradients into the criterion's statistics (those that keep per-step ones)."""
        if not self.criterion.per_step_gradients or not has_grads(self.modules):
            return  # no backward this step (e.g. a custom loop calling us early): nothing to add
        with torch.no_grad():
            self.criterion.accumulate()

    def _remove(self, name: str, removed: list[int]) -> None:
        module, mask = self.modules[name], self.masks[name]
        active = mask.nonzero().flatten()
        position = {int(j): p for p, j in enumerate(active.tolist())}
        order = [position[j] for j in removed]
        if self.config.recovery != "none" and has_grads({name: module}):
            b, a = module.lora_b.data, module.lora_a.data
            grad_b, grad_a = active_grads(module, active)
            hinv_b, hinv_a = self.criterion.recovery_hessians(name, active, grad_b, grad_a)
            new_b = remove_components(b[:, active], grad_b, hinv_b, order, self.config.recovery).weight_rows
            b[:, active] = new_b.to(b.dtype)
            if hinv_a is not None:
                new_a_rows = remove_components(
                    a[active, :].T, grad_a.T, hinv_a, order, self.config.recovery
                ).weight_rows
                a[active, :] = new_a_rows.T.to(a.dtype)
        mask[removed] = False
        self._apply_mask(module, mask)

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

    def consolidate_statistics(self) -> None:
        """Gather the criterion's input statistics on process 0 (call on every process, before saving)."""
        self.criterion.consolidate()

    def remove_hooks(self) -> None:
        self.criterion.close()

    # -- checkpointing --------------------------------------------------------------------------
    # A checkpoint holds the masks and the criterion's statistics as tensors (``kind::module``; masks
    # under ``mask::``), the history and the criterion's counters as JSON.
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: m.clone() for n, m in self.masks.items()},
            **self.criterion.state_dict(),
            "history": json.loads(json.dumps(self.history)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masks = state["masks"]
        if set(masks) != set(self.masks):
            missing, extra = sorted(set(self.masks) - set(masks)), sorted(set(masks) - set(self.masks))
            raise PrunedLoraError(f"pruner state does not match this model: missing {missing[:3]}, extra {extra[:3]}")
        self.masks = {n: masks[n].to(torch.bool).clone() for n in self.masks}
        self.criterion.load_state_dict(state)
        self.history = list(state["history"])
        for name, mask in self.masks.items():
            self._apply_mask(self.modules[name], mask)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        tensors = {f"mask::{n}": m for n, m in state.pop("masks").items()}
        record = {"history": state.pop("history")}
        for key, value in state.items():
            if isinstance(value, dict):
                tensors.update({f"{key}::{n}": t for n, t in value.items()})
            else:
                record[key] = value
        save_file(tensors, str(directory / STATE_TENSORS_FILE))
        (directory / STATE_HISTORY_FILE).write_text(json.dumps(record))

    def load(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        tensors = load_file(str(directory / STATE_TENSORS_FILE))
        state: dict[str, Any] = json.loads((directory / STATE_HISTORY_FILE).read_text())
        state["masks"] = {}
        for key, value in tensors.items():
            kind, name = key.split("::", 1)
            state.setdefault("masks" if kind == "mask" else kind, {})[name] = value
        self.load_state_dict(state)

    @staticmethod
    def has_saved_state(directory: str | os.PathLike) -> bool:
        return (Path(directory) / STATE_TENSORS_FILE).is_file()
