"""Which weights form a prunable group in a Llama-like decoder, and how many groups a target removes.

A **KV group** is one key/value head with everything that reads it: its K and V rows (``head_dim``
each), the ``num_heads / num_kv_heads`` query heads that share it (their q rows) and those query heads'
o_proj input columns. Removing whole KV groups keeps every layer legal grouped-query attention: query
heads stay a multiple of KV heads and each query head stays beside its own KV head (query head ``i``
reads KV head ``i // heads_per_group`` before and after). Pruning single query heads would break that
for SmolLM2-135M (9 query heads over 3 KV heads), which is where the released code (32 heads of 128
hard-coded) fails.

An **MLP channel** is a gate row, an up row and a down_proj input column.

**One width for every layer.** A Hugging Face (and vLLM) config holds one ``num_key_value_heads`` and
one ``intermediate_size``, so a model exported to a standard config must keep the same *number* of KV
groups and channels in every layer (which ones are kept differs per layer). The plan therefore removes
the same counts from every pruned layer. Layers exempt from pruning (``exempt_layers: released``) stay
full and make the widths differ: such a plan is for masked-model studies and slicing refuses it.

**Head counts transformers accepts.** Hugging Face's ``LlamaConfig`` (transformers 5) refuses a
``hidden_size`` that is not a multiple of ``num_attention_heads`` even when ``head_dim`` is explicit, so
only KV-group counts whose query heads divide ``hidden_size`` are planned (SmolLM2: 3 or 6 query heads of
9, both divide 576); the same rule holds for every model type so one plan means one thing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prunedlora.loraprune.errors import LorapruneError

if TYPE_CHECKING:  # the config validates criteria through criteria -> importance -> this module
    from prunedlora.loraprune.config import LorapruneConfig

# The model types whose decoder layers are q/k/v/o + gate/up/down with (grouped-query) attention and
# a per-layer shape given by the config alone; anything else is refused rather than sliced wrongly.
LLAMA_LIKE = ("llama", "mistral", "qwen2")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# modules whose group is a set of output rows; the others (o_proj, down_proj) own input columns
ROW_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
# "layers.<i>.<self_attn|mlp>.<projection>": groups: (layer index, projection name); shared with slicing
PROJECTION_PATH = rf"layers\.(\d+)\.(?:self_attn|mlp)\.({'|'.join(ATTENTION + MLP)})"
_MODULE_PATH = re.compile(rf"(?:^|\.){PROJECTION_PATH}$")


@dataclass(frozen=True)
class DecoderShape:
    """The per-layer shape of a Llama-like decoder, from its config."""

    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def group_weights(self) -> int:
        """Weights in one KV group: q and o for each of its query heads, plus its K and V rows."""
        return self.hidden * self.head_dim * (2 * self.heads_per_group + 2)

    @property
    def channel_weights(self) -> int:
        """Weights in one MLP channel: a gate row, an up row, a down column."""
        return 3 * self.hidden

    @property
    def layer_weights(self) -> int:
        return self.num_kv_heads * self.group_weights + self.intermediate * self.channel_weights

    def loadable(self, groups_kept: int) -> bool:
        """Whether ``groups_kept`` KV groups give a head count a Hugging Face config accepts."""
        return groups_kept >= 1 and self.hidden % (groups_kept * self.heads_per_group) == 0

    def q_columns(self, groups) -> list[int]:
        """The q rows (equally, o_proj input columns) of the query heads of KV ``groups``, in order."""
        g, d = self.heads_per_group, self.head_dim
        return [h * d + i for j in groups for h in range(j * g, (j + 1) * g) for i in range(d)]

    def kv_rows(self, groups) -> list[int]:
        d = self.head_dim
        return [j * d + i for j in groups for i in range(d)]


def check_gqa(num_heads: int, num_kv_heads: int) -> None:
    """Refuse a head count that is not legal grouped-query attention."""
    if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
        raise LorapruneError(
            f"{num_heads} query heads over {num_kv_heads} KV heads is not grouped-query attention "
            "(query heads must be a positive multiple of KV heads)"
        )


def decoder_shape(config) -> DecoderShape:
    """The shape of a Hugging Face config (or a model's ``.config``); refuses a model that is not
    Llama-like, since its groups would be guessed."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_LIKE:
        raise LorapruneError(
            f"LoRAPrune slices Llama-like decoders ({', '.join(LLAMA_LIKE)}); this model is {model_type!r}"
        )
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    check_gqa(heads, kv)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return DecoderShape(config.num_hidden_layers, config.hidden_size, heads, kv, head_dim, config.intermediate_size)


def find_projections(model) -> dict[int, dict[str, object]]:
    """Layer index -> projection name -> the outermost module of that projection (the PEFT LoRA layer
    when the projection carries one, so a hook on it sees both the base and the LoRA path).

    Refuses a model whose layers lack any of the seven projections."""
    found: dict[int, dict[str, object]] = {}
    for name, module in model.named_modules():
        match = _MODULE_PATH.search(name)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = module
    if not found or any(len(mods) != len(ATTENTION) + len(MLP) for mods in found.values()):
        raise LorapruneError(
            "LoRAPrune needs every decoder layer to have q/k/v/o_proj and gate/up/down_proj (a Llama-like model)"
        )
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class PrunePlan:
    """How many KV groups and channels each pruned layer loses at the end of pruning."""

    shape: DecoderShape
    groups_removed: int
    channels_removed: int
    exempt: tuple[int, ...]
    target_sparsity: float

    @property
    def pruned_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.shape.num_layers) if i not in self.exempt)

    @property
    def removed_weights(self) -> int:
        s = self.shape
        return len(self.pruned_layers) * (
            self.groups_removed * s.group_weights + self.channels_removed * s.channel_weights
        )

    @property
    def achieved_sparsity(self) -> float:
        """The fraction of the prunable linear weights the plan removes (heads go by whole KV groups, so
        this is the reachable fraction closest to the target, not the target itself)."""
        return self.removed_weights / (self.shape.num_layers * self.shape.layer_weights)

    @property
    def exportable(self) -> bool:
        """True when every layer keeps the same widths (a standard config can describe the result)."""
        return not self.exempt


def plan_counts(shape: DecoderShape, groups_removed: int, channels_removed: int, exempt=(), target=0.0) -> PrunePlan:
    """A plan from explicit counts, refused when a layer would lose all its KV groups or channels."""
    if not 0 <= groups_removed < shape.num_kv_heads:
        raise LorapruneError(
            f"removing {groups_removed} of {shape.num_kv_heads} KV groups per layer breaks grouped-query attention "
            f"(0 to {shape.num_kv_heads - 1} may go; query heads go with their KV head, "
            f"{shape.heads_per_group} at a time): lower the sparsity or prune channels too"
        )
    kept = shape.num_kv_heads - groups_removed
    if not shape.loadable(kept):
        raise LorapruneError(
            f"keeping {kept} KV groups leaves {kept * shape.heads_per_group} query heads, and hidden_size "
            f"{shape.hidden} is not a multiple of that (Hugging Face's Llama config refuses it): choose another sparsity"
        )
    if not 0 <= channels_removed < shape.intermediate:
        raise LorapruneError(
            f"removing {channels_removed} of {shape.intermediate} MLP channels per layer leaves no MLP "
            f"(0 to {shape.intermediate - 1} may go): lower the sparsity or prune heads too"
        )
    if groups_removed == 0 and channels_removed == 0:
        raise LorapruneError("the plan removes nothing: raise the sparsity or prune the other kind of group too")
    return PrunePlan(shape, groups_removed, channels_removed, tuple(sorted(exempt)), float(target))


def plan(config: LorapruneConfig, shape: DecoderShape) -> PrunePlan:
    """The counts per pruned layer that come closest to ``config.sparsity`` of all prunable weights.

    Rule (simple and stated): the pruned layers share the removal equally. With both kinds pruned, the
    KV groups removed are the share ``s`` of the layer's KV groups rounded to the nearest count (the
    paper prunes heads and channels at one ratio), and the channels make up the rest of the target, so
    the coarse head step is compensated by the fine channel step. With one kind, that kind takes it all.
    """
    exempt = config.exempt(shape.num_layers)
    pruned = shape.num_layers - len(exempt)
    if pruned < 1:
        raise LorapruneError("every layer is exempt from pruning: use exempt_layers: none")
    per_layer = config.sparsity * shape.num_layers * shape.layer_weights / pruned  # weights removed per pruned layer
    share = per_layer / shape.layer_weights
    if config.prune_heads and config.prune_channels:
        groups = _nearest_loadable(shape, share * shape.num_kv_heads)
        channels = round((per_layer - groups * shape.group_weights) / shape.channel_weights)
        if channels < 0:  # the head share alone overshoots: take the next smaller loadable count
            groups = _nearest_loadable(shape, groups - 1)
            channels = max(0, round((per_layer - groups * shape.group_weights) / shape.channel_weights))
    elif config.prune_heads:
        wanted = per_layer / shape.group_weights
        groups = round(wanted) if round(wanted) >= shape.num_kv_heads else _nearest_loadable(shape, wanted)
        channels = 0
    else:
        groups, channels = 0, round(per_layer / shape.channel_weights)
    return plan_counts(shape, groups, channels, exempt, config.sparsity)


def _nearest_loadable(shape: DecoderShape, wanted: float) -> int:
    """The number of KV groups to remove closest to ``wanted`` (ties: the larger) that leaves at least one
    group and a head count Hugging Face accepts."""
    options = [x for x in range(shape.num_kv_heads) if shape.loadable(shape.num_kv_heads - x)]
    return min(options, key=lambda x: (abs(x - wanted), -x))
