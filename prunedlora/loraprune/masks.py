"""Masks of pruned KV groups and MLP channels, applied during training with forward pre-hooks.

Where a mask acts matters. A pruned head is zeroed at its attention output (the o_proj input): a
zeroed query row would give uniform attention over the keys, still a non-zero output, so masking q
would not match the sliced model. A pruned channel is zeroed at the down_proj input. Hooks sit on the
outermost module of o_proj/down_proj (the PEFT LoRA layer), so the base path and the LoRA path both see
the masked input, as they will see the sliced one. A mask only ever loses entries: a pruned group never
returns. The masks are plain tensors in a ``state_dict`` so a checkpoint restores them and every DDP
process, fed the same gradients, holds the same ones.
"""

from __future__ import annotations

import torch

from prunedlora.loraprune.errors import LorapruneError
from prunedlora.loraprune.groups import DecoderShape


class GroupMasks:
    """``heads[l, j]`` / ``channels[l, c]``: True while KV group ``j`` / channel ``c`` of layer ``l`` is kept."""

    def __init__(self, shape: DecoderShape):
        self.shape = shape
        self.heads = torch.ones(shape.num_layers, shape.num_kv_heads, dtype=torch.bool)
        self.channels = torch.ones(shape.num_layers, shape.intermediate, dtype=torch.bool)
        self.version = 0  # bumped by every change, so hooks know when their device copy is stale
        self._handles: list = []

    # -- state -----------------------------------------------------------------------------------
    def remove(self, layer: int, groups=(), channels=()) -> None:
        """Mask KV ``groups`` and ``channels`` of ``layer`` (already masked ones stay masked)."""
        self.heads[layer, list(groups)] = False
        self.channels[layer, list(channels)] = False
        self.version += 1

    def kept_groups(self, layer: int) -> list[int]:
        return self.heads[layer].nonzero().flatten().tolist()

    def kept_channels(self, layer: int) -> list[int]:
        return self.channels[layer].nonzero().flatten().tolist()

    def uniform_widths(self) -> tuple[int, int] | None:
        """(KV groups, channels) kept in every layer, or None when layers keep different counts."""
        groups, channels = set(self.heads.sum(1).tolist()), set(self.channels.sum(1).tolist())
        return (groups.pop(), channels.pop()) if len(groups) == 1 and len(channels) == 1 else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"heads": self.heads.clone(), "channels": self.channels.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        heads, channels = state["heads"], state["channels"]
        if tuple(heads.shape) != tuple(self.heads.shape) or tuple(channels.shape) != tuple(self.channels.shape):
            raise LorapruneError(
                f"saved masks have shapes {tuple(heads.shape)} and {tuple(channels.shape)}, this model needs "
                f"{tuple(self.heads.shape)} and {tuple(self.channels.shape)}: they belong to another model"
            )
        if not heads.any(1).all() or not channels.any(1).all():
            raise LorapruneError("saved masks leave a layer without any KV group or channel: they are damaged")
        self.heads.copy_(heads.bool())
        self.channels.copy_(channels.bool())
        self.version += 1

    # -- hooks -----------------------------------------------------------------------------------
    def head_columns(self, layer: int) -> torch.Tensor:
        """The o_proj input mask: each KV group's flag repeated over its query heads' dimensions."""
        return self.heads[layer].repeat_interleave(self.shape.heads_per_group * self.shape.head_dim)

    def attach(self, projections: dict[int, dict[str, object]]) -> None:
        """Install the pre-hooks on each layer's o_proj and down_proj (``groups.find_projections``)."""
        self.detach()
        for layer, mods in projections.items():
            self._handles.append(mods["o_proj"].register_forward_pre_hook(_MaskInput(self, layer, "heads")))
            self._handles.append(mods["down_proj"].register_forward_pre_hook(_MaskInput(self, layer, "channels")))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _MaskInput:
    """A pre-hook reading the live mask, so a later ``remove`` acts without re-hooking; the mask's copy on
    the activations' device and dtype is made once per change, not once per forward."""

    def __init__(self, masks: GroupMasks, layer: int, kind: str):
        self.masks, self.layer, self.kind = masks, layer, kind
        self._cached: tuple | None = None  # (version, device, dtype, multiplier or None when nothing is masked)

    def _multiplier(self, x: torch.Tensor) -> torch.Tensor | None:
        key = (self.masks.version, x.device, x.dtype)
        if self._cached is None or self._cached[:3] != key:
            keep = self.masks.head_columns(self.layer) if self.kind == "heads" else self.masks.channels[self.layer]
            multiplier = None if bool(keep.all()) else keep.to(device=x.device, dtype=x.dtype)
            self._cached = (*key, multiplier)
        return self._cached[3]

    def __call__(self, module, args):
        multiplier = self._multiplier(args[0])
        if multiplier is None:
            return None
        return (args[0] * multiplier, *args[1:])
