"""vLLM's facts about LoRA adapters, owned in one place.

``export`` checks what it writes against these and ``serve`` validates what it loads against them;
neither imports vLLM for it, so export works in environments without vLLM.
"""

from __future__ import annotations

# vLLM's LoRAConfig accepts only these values of max_lora_rank (vllm/config/lora.py); every adapter
# is zero-padded to that slot rank, so a tighter slot is cheaper.
ALLOWED_MAX_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# PEFT adapter types vLLM's LoRA loader understands.
SUPPORTED_PEFT_TYPES: frozenset[str] = frozenset({"LORA"})


def smallest_slot_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM allows that holds an adapter module of this rank."""
    if rank < 1:
        raise ValueError(f"an adapter rank must be at least 1, got {rank}")
    for slot in ALLOWED_MAX_LORA_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(
        f"rank {rank} exceeds vLLM's largest LoRA slot ({ALLOWED_MAX_LORA_RANKS[-1]}); "
        "reduce it with `prunedlora export --svd-truncate --max-rank R`"
    )
