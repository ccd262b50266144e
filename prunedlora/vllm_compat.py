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


# -- what vLLM 0.32's PEFTHelper accepts (vllm/lora/peft_helper.py) ------------------------------

# init_lora_weights values that only choose the starting weights, so a saved adapter is a plain
# LoRA; other strings (pissa, olora, corda, loftq) also rewrite the base weights when PEFT loads
# the adapter, so the adapter alone is not the model vLLM would serve.
PLAIN_LORA_INITS: frozenset[str] = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})

# rank_pattern / alpha_pattern keys are matched like PEFT's get_pattern_key does: a key matches a
# module name when ``re.match(PATTERN_MATCH.format(key=key), name)``; the first matching key wins.
# The name is the adapter's tensor name without ``base_model.model.`` and the ``.lora_A.weight``.
PATTERN_MATCH = r"(.*\.)?({key})$"


def unsupported_lora_features(adapter_config: dict) -> list[str]:
    """The features of a PEFT adapter_config.json that vLLM refuses (empty list: vLLM accepts it).

    Mirrors ``PEFTHelper._validate_features`` and ``validate_legal`` so an adapter can be checked
    before vLLM sees it: one bad adapter kills vLLM 0.32's engine for every later request.
    """
    problems = []
    peft_type = str(adapter_config.get("peft_type", "LORA")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        problems.append(f"peft_type {peft_type} (vLLM loads only {sorted(SUPPORTED_PEFT_TYPES)})")
    extra = [m for m in adapter_config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if extra:
        problems.append(f"modules_to_save {extra}")
    for flag, what in (
        ("use_dora", "DoRA"),
        ("lora_bias", "LoRA bias"),
        ("alora_invocation_tokens", "aLoRA"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "BD-LoRA"),
        ("use_qalora", "QALoRA"),
    ):
        if adapter_config.get(flag):
            problems.append(what)
    init = adapter_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_LORA_INITS:
        problems.append(f"init_lora_weights={init!r}")
    if adapter_config.get("bias", "none") != "none":
        problems.append(f"bias={adapter_config.get('bias')!r}")
    return problems


# --- LoRA adapter format facts (vllm/lora/peft_helper.py, vllm/lora/lora_model.py) -----------------

# vLLM reads only PEFT's safetensors weights file (``modelfacts.ADAPTER_WEIGHTS_FILE``) without
# unpickling; it falls back to these pickled files, which run code from whoever made them when loaded,
# so ``serve`` refuses an adapter that ships one.
PICKLED_ADAPTER_FILES: tuple[str, ...] = ("adapter_model.bin", "adapter_model.pt")

# adapter_config.json fields without a default in vLLM's PEFTHelper: a config lacking one fails there.
REQUIRED_LORA_CONFIG_FIELDS: tuple[str, ...] = ("r", "lora_alpha", "target_modules")

# Module names whose LoRA vLLM applies through its embedding/logits wrappers rather than its linear
# layers; ``serve`` validates only linear-layer LoRA, so it refuses these before vLLM sees them.
EMBEDDING_MODULE_NAMES: frozenset[str] = frozenset({"embed_tokens", "lm_head", "wte", "embed_in", "embed_out"})


def lora_rank_for_slot(r: int, rank_pattern: dict[str, int] | None) -> int:
    """The rank vLLM compares against max_lora_rank: the config's ``r`` and every rank_pattern value.

    vLLM checks the config, not the tensors (PEFTHelper.validate_legal), so an adapter whose config
    says r=64 needs a 64 slot even if every module's tensors are smaller.
    """
    return max([int(r), *(int(v) for v in (rank_pattern or {}).values())])


def pattern_value(pattern: dict[str, float] | None, module_name: str):
    """The rank_pattern/alpha_pattern value for a module, or None: the first key that matches the
    module name as a suffix starting at a '.' boundary (vLLM's and PEFT's rule)."""
    import re

    for key, value in (pattern or {}).items():
        if re.match(PATTERN_MATCH.format(key=key), module_name):
            return value
    return None


def vllm_has_architecture(architecture: str) -> bool | None:
    """Whether the installed vLLM names ``architecture`` (a config.json ``architectures`` entry) in its
    model registry; None when vLLM is not installed or its registry cannot be read.

    Read as text from ``vllm/model_executor/models/registry.py`` rather than imported: importing vLLM's
    model registry takes many seconds, and ``serve --dry-run`` starts nothing.
    """
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    registry = Path(next(iter(spec.submodule_search_locations))) / "model_executor" / "models" / "registry.py"
    try:
        return f'"{architecture}"' in registry.read_text()
    except OSError:
        return None
