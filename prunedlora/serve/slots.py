"""Choose vLLM's LoRA slot settings from the adapters it will serve.

vLLM reserves, for each of ``max_loras`` GPU slots, ``max_lora_rank`` rows of A and B in every LoRA
module and zero-pads each adapter to that rank; ``max_cpu_loras`` adapters are kept ready in host
memory. Heterogeneous-rank adapters therefore cost what the widest one costs, and the slot rank is
the one setting worth choosing tightly: the smallest value vLLM allows that holds every adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from prunedlora.errors import PrunedLoraError
from prunedlora.serve.validate import AdapterInfo
from prunedlora.vllm_compat import ALLOWED_MAX_LORA_RANKS, smallest_slot_rank

# With no adapter to size it from (a server that only gets adapters at runtime), vLLM's own default.
DEFAULT_EMPTY_SLOT_RANK = 16
# Distinct adapters one batch may mix; more costs memory and per-step work on every LoRA layer.
DEFAULT_MAX_LORAS_CAP = 4


class SlotError(PrunedLoraError):
    """Forced slot settings that cannot hold the adapters, or that vLLM would refuse."""


@dataclass
class SlotPlan:
    """vLLM's LoRA settings and what padding every adapter to ``max_lora_rank`` costs."""

    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    padding: float
    adapter_padding: dict[str, float] = field(default_factory=dict)
    widest: str | None = None
    forced: tuple[str, ...] = ()

    def vllm_args(self) -> list[str]:
        """The flags of ``vllm serve`` that carry this plan."""
        return [
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--max-loras",
            str(self.max_loras),
            "--max-cpu-loras",
            str(self.max_cpu_loras),
        ]

    def describe(self) -> str:
        """Human-readable lines: the choice, why, and the padding cost per adapter."""
        how = lambda key: "forced" if key in self.forced else "chosen"  # noqa: E731
        lines = [
            f"vLLM LoRA slots: max_lora_rank={self.max_lora_rank} ({how('max_lora_rank')}"
            + (f"; widest: {self.widest}" if self.widest else "")
            + f"), max_loras={self.max_loras} ({how('max_loras')}), max_cpu_loras={self.max_cpu_loras} "
            f"({how('max_cpu_loras')})"
        ]
        if self.adapter_padding:
            lines.append(
                f"padding every adapter to rank {self.max_lora_rank}: {self.padding:.1%} of the slot rows its "
                "modules use are zero"
            )
            width = max(len(name) for name in self.adapter_padding)
            for name, frac in self.adapter_padding.items():
                lines.append(f"  {name:<{width}}  {frac:6.1%} zero rows")
            if self.max_cpu_loras < len(self.adapter_padding):
                lines.append(
                    f"max_cpu_loras={self.max_cpu_loras} is below the {len(self.adapter_padding)} adapters: vLLM "
                    "evicts the least recently used and reloads it from disk when it is asked for"
                )
        return "\n".join(lines)


def padding_fraction(ranks: Mapping[str, int], slot_rank: int) -> float:
    """The fraction of slot rows that are zero when these module ranks are padded to ``slot_rank``."""
    if not ranks:
        return 0.0
    return 1.0 - sum(ranks.values()) / (slot_rank * len(ranks))


def plan_slots(
    adapters: Mapping[str, AdapterInfo],
    *,
    max_lora_rank: int | None = None,
    max_loras: int | None = None,
    max_cpu_loras: int | None = None,
) -> SlotPlan:
    """Choose (or check forced) max_lora_rank, max_loras and max_cpu_loras for these adapters.

    ``max_lora_rank`` defaults to the smallest value vLLM allows at or above the largest rank any
    adapter needs; ``max_loras`` to the number of adapters, capped at 4; ``max_cpu_loras`` to at
    least the number of adapters, so none is evicted and reloaded from disk. A forced slot smaller
    than an adapter is refused naming the adapter and module.
    """
    forced = tuple(
        key
        for key, value in (("max_lora_rank", max_lora_rank), ("max_loras", max_loras), ("max_cpu_loras", max_cpu_loras))
        if value is not None
    )
    widest_name = max(adapters, key=lambda n: adapters[n].slot_rank, default=None)
    widest = None
    if widest_name is not None:
        info = adapters[widest_name]
        widest = f"adapter {widest_name!r} {info.widest_module} rank {info.slot_rank}"
    needed = adapters[widest_name].slot_rank if widest_name is not None else 0

    if max_lora_rank is None:
        try:
            rank = smallest_slot_rank(needed) if needed else DEFAULT_EMPTY_SLOT_RANK
        except ValueError as err:
            raise SlotError(f"{widest}: {err}") from err
    else:
        if max_lora_rank not in ALLOWED_MAX_LORA_RANKS:
            raise SlotError(
                f"--max-lora-rank {max_lora_rank} is not a value vLLM allows; use one of "
                f"{', '.join(map(str, ALLOWED_MAX_LORA_RANKS))}"
            )
        if needed > max_lora_rank:
            raise SlotError(
                f"--max-lora-rank {max_lora_rank} is smaller than {widest}; use --max-lora-rank "
                f"{smallest_slot_rank(needed)} or leave it out, or cut the adapter with "
                "`prunedlora export --svd-truncate --max-rank R`"
            )
        rank = max_lora_rank

    if max_loras is None:
        loras = max(1, min(len(adapters), DEFAULT_MAX_LORAS_CAP))
    elif max_loras < 1:
        raise SlotError(f"--max-loras must be at least 1, got {max_loras}")
    else:
        loras = max_loras

    if max_cpu_loras is None:
        cpu_loras = max(len(adapters), loras)
    elif max_cpu_loras < loras:
        raise SlotError(
            f"--max-cpu-loras {max_cpu_loras} is below --max-loras {loras}; vLLM needs max_cpu_loras >= max_loras"
        )
    else:
        cpu_loras = max_cpu_loras

    per_adapter = {name: padding_fraction(info.ranks, rank) for name, info in adapters.items()}
    total_rows = sum(rank * len(info.modules) for info in adapters.values())
    used_rows = sum(sum(info.ranks.values()) for info in adapters.values())
    padding = 1.0 - used_rows / total_rows if total_rows else 0.0
    return SlotPlan(
        max_lora_rank=rank,
        max_loras=loras,
        max_cpu_loras=cpu_loras,
        padding=padding,
        adapter_padding=per_adapter,
        widest=widest,
        forced=forced,
    )
