"""LoraPruner: the object a training loop drives, one call per optimizer step.

It owns the masks, the moving-average importance and the event list; it knows nothing of Trainer, so a
custom loop, Trainer (see ``prunedlora.train``) and torchrun drive the same code. Call
``before_optimizer_step(step)`` after backward, gradient accumulation and clipping (the gradients are
then the step's, all-reduced under DDP) and before ``optimizer.step()``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prunedlora import metadata
from prunedlora.loraprune.config import LorapruneConfig
from prunedlora.loraprune.criteria import criterion
from prunedlora.loraprune.errors import LorapruneError
from prunedlora.loraprune.groups import ATTENTION, MLP, decoder_shape, find_projections, plan
from prunedlora.loraprune.importance import lora_parts
from prunedlora.loraprune.masks import GroupMasks
from prunedlora.loraprune.schedule import prune_events

# The pruner's state in a checkpoint folder and in a finished run directory (masks, importance, config).
STATE_FILE = metadata.LORAPRUNE_STATE_FILE


def read_state(folder) -> dict:
    """The state saved by ``LoraPruner.save`` in ``folder``; one line when it is missing or unreadable."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise LorapruneError(f"{path} is missing: {folder} was not written by a LoRAPrune run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: several exception types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LorapruneError(f"{path} is not a readable LoRAPrune state: {first}") from err
    if not isinstance(state, dict) or not {"config", "masks"} <= set(state):
        raise LorapruneError(f"{path} is not a LoRAPrune state (no config and masks)")
    return state


class LoraPruner:
    """Scores groups every step, masks the lowest-scored ones of each pruned layer at event steps.

    With ``criterion: grad`` the frozen base weights get ``requires_grad`` so autograd forms their true
    gradient; a hook moves it into this object's buffer as soon as it is accumulated and clears
    ``.grad``, so gradient clipping and the optimizer never see it (no base weight is ever updated) and
    the memory cost of that buffer is the cost the comparison with ``lora`` measures.
    """

    def __init__(self, model, config: LorapruneConfig, total_steps: int):
        self.config = config
        self.shape = decoder_shape(model.config)
        self.plan = plan(config, self.shape)
        self.projections = find_projections(model)
        if len(self.projections) != self.shape.num_layers:
            raise LorapruneError(
                f"the model has {len(self.projections)} decoder layers, its config says {self.shape.num_layers}"
            )
        self.criterion = criterion(config.criterion)
        if self.criterion.from_lora:
            self._check_lora_targets()
        self.events = prune_events(config, total_steps, self.plan.groups_removed, self.plan.channels_removed)
        self.masks = GroupMasks(self.shape)
        self.masks.attach(self.projections)
        self.head_importance = torch.zeros(self.shape.num_layers, self.shape.num_kv_heads)
        self.channel_importance = torch.zeros(self.shape.num_layers, self.shape.intermediate)
        self.steps_scored = 0
        self._generator = torch.Generator().manual_seed(config.seed)
        self._base_grads: dict[int, dict[str, torch.Tensor]] = {}
        self._grad_handles: list = []
        self._input_sq: dict[int, dict[str, torch.Tensor]] = {}
        self._input_handles: list = []
        if self.criterion.base_gradients:
            self._track_base_grads()
        if self.criterion.input_norms:
            self._track_input_norms()

    # -- the per-step call -----------------------------------------------------------------------
    def before_optimizer_step(self, step: int) -> bool:
        """Accumulate importance from this step's gradients; at an event step mask the lowest groups.
        Returns True when this step masked something."""
        if not self.events or step > self.events[-1].step:
            self._stop_scoring()  # pruning is over: no more scoring, no more base gradients
            return False
        self._accumulate()
        event = next((e for e in self.events if e.step == step), None)
        if event is None:
            return False
        for layer in self.plan.pruned_layers:
            self._mask_lowest(layer, event.groups_removed, event.channels_removed)
        if event is self.events[-1]:
            self._stop_scoring()
        return True

    def _accumulate(self) -> None:
        """One EMA update from this step's scores; a step whose scores are not finite (a half-precision
        overflow) is skipped as a whole, as the released code does, rather than poisoning the average."""
        ema = self.config.ema
        norms = self._input_norms()
        scores = {
            layer: self.criterion.layer_scores(
                self.projections[layer],
                self.shape,
                self._base_grads.get(layer),
                self._generator,
                norms.get(layer),
            )
            for layer in self.plan.pruned_layers
        }
        self._base_grads.clear()
        if any(t is not None and not bool(torch.isfinite(t).all()) for pair in scores.values() for t in pair):
            return
        for layer, (heads, channels) in scores.items():
            if heads is not None and self.config.prune_heads:
                self.head_importance[layer] = ema * self.head_importance[layer] + (1 - ema) * heads.float()
            if channels is not None and self.config.prune_channels:
                self.channel_importance[layer] = ema * self.channel_importance[layer] + (1 - ema) * channels.float()
        self.steps_scored += 1

    def _mask_lowest(self, layer: int, groups: int, channels: int) -> None:
        """Mask the lowest-importance kept groups until ``groups``/``channels`` are gone from ``layer``."""
        for kind, target, importance, kept in (
            ("heads", groups, self.head_importance[layer], self.masks.heads[layer]),
            ("channels", channels, self.channel_importance[layer], self.masks.channels[layer]),
        ):
            more = target - int((~kept).sum())
            if more <= 0:
                continue
            scores = importance.masked_fill(~kept, float("inf"))
            lowest = torch.argsort(scores, stable=True)[:more].tolist()
            if kind == "heads":
                self.masks.remove(layer, groups=lowest)
            else:
                self.masks.remove(layer, channels=lowest)

    # -- criteria that read the inputs (lora-act): each projection's input feature norms over the step's tokens -----------
    def _track_input_norms(self) -> None:
        for layer, mods in self.projections.items():
            if layer not in self.plan.pruned_layers:
                continue
            for name, module in mods.items():  # after the mask hooks: a masked feature reads 0
                self._input_handles.append(module.register_forward_pre_hook(self._input_taker(layer, name)))

    def _input_taker(self, layer: int, name: str):
        def take(module, args) -> None:
            if not module.training:  # an evaluation pass is not the step's data
                return
            x = args[0].detach()
            sq = x.float().square().sum(dim=tuple(range(x.dim() - 1)))
            store = self._input_sq.setdefault(layer, {})
            store[name] = sq if name not in store else store[name] + sq

        return take

    def _input_norms(self) -> dict[int, dict[str, torch.Tensor]]:
        """This step's input feature norms (summed over gradient-accumulation micro-batches and, under
        DDP, over processes, so every process scores alike), and the sums cleared for the next step."""
        if not self._input_sq:
            return {}
        keys = [(layer, name) for layer in sorted(self._input_sq) for name in sorted(self._input_sq[layer])]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = torch.cat([self._input_sq[layer][name] for layer, name in keys])
            torch.distributed.all_reduce(flat)
            parts = flat.split([self._input_sq[layer][name].numel() for layer, name in keys])
            for (layer, name), part in zip(keys, parts):
                self._input_sq[layer][name] = part
        norms: dict[int, dict[str, torch.Tensor]] = {}
        for layer, name in keys:
            norms.setdefault(layer, {})[name] = self._input_sq[layer][name].sqrt()
        self._input_sq.clear()
        return norms

    def _stop_scoring(self) -> None:
        """Remove every scoring hook (base-gradient takers, input-norm takers): pruning is over."""
        self._stop_base_grads()
        for handle in self._input_handles:
            handle.remove()
        self._input_handles.clear()
        self._input_sq.clear()

    # -- criteria that read W0's true gradient (grad) ----------------------------------------------------------------------------
    def _track_base_grads(self) -> None:
        for layer, mods in self.projections.items():
            if layer not in self.plan.pruned_layers:
                continue
            for name, module in mods.items():
                weight = lora_parts(module)[0]
                weight.requires_grad_(True)
                self._grad_handles.append(weight.register_post_accumulate_grad_hook(self._grad_taker(layer, name)))

    def _stop_base_grads(self) -> None:
        """Remove the gradient takers and freeze the base weights again (``grad`` criterion)."""
        self._base_grads.clear()
        if not self._grad_handles:
            return
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles.clear()
        for mods in self.projections.values():
            for module in mods.values():
                weight = lora_parts(module)[0]
                weight.requires_grad_(False)
                weight.grad = None

    def _grad_taker(self, layer: int, name: str):
        def take(param: torch.Tensor) -> None:
            store = self._base_grads.setdefault(layer, {})
            store[name] = param.grad.detach() if name not in store else store[name] + param.grad.detach()
            param.grad = None

        return take

    def _check_lora_targets(self) -> None:
        for kind, names in (("heads", ATTENTION), ("channels", MLP)):
            wanted = self.config.prune_heads if kind == "heads" else self.config.prune_channels
            if wanted and not any(lora_parts(self.projections[0][n])[1] is not None for n in names):
                raise LorapruneError(
                    f"criterion {self.config.criterion} scores {kind} from LoRA factors, but none of {', '.join(names)} carries a "
                    "LoRA: add them to target_modules"
                )

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "masks": self.masks.state_dict(),
            "head_importance": self.head_importance.clone(),
            "channel_importance": self.channel_importance.clone(),
            "steps_scored": self.steps_scored,
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.masks.load_state_dict(state["masks"])
        self.head_importance.copy_(state["head_importance"])
        self.channel_importance.copy_(state["channel_importance"])
        self.steps_scored = int(state["steps_scored"])
        self._generator.set_state(state["generator"])

    def save(self, folder) -> Path:
        """Write the state to ``folder/loraprune.pt`` (a temporary name renamed into place)."""
        path = Path(folder) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        return path

    def load(self, folder) -> None:
        state = read_state(folder)
        if state["config"] != self.config.to_dict():
            raise LorapruneError(
                f"{Path(folder) / STATE_FILE} was saved with loraprune settings {state['config']}, this run has "
                f"{self.config.to_dict()}: resume with the same recipe"
            )
        self.load_state_dict(state)

    @property
    def summary(self) -> dict:
        """Kept widths now and the plan's target, for logs."""
        return {
            "kv_groups_kept": int(self.masks.heads.sum(1).min()),
            "channels_kept": int(self.masks.channels.sum(1).min()),
            "planned_sparsity": self.plan.achieved_sparsity,
        }

    def close(self) -> None:
        """Remove the hooks (masks, gradient and input-norm takers); frozen weights are frozen again."""
        self.masks.detach()
        self._stop_scoring()
