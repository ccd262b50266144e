"""``export_pruned``: a finished LoRAPrune run directory -> a smaller standard base + its sliced adapter.

The run directory holds what ``train`` always writes (the PEFT adapter and its run record naming the
base model) plus ``loraprune.pt`` with the final masks. The masked training model is rebuilt from those
files (the base, the adapter, the masks hooked where training hooked them), so the export is checked
against the model that training actually ran, not against a second copy of its logic.
"""

from __future__ import annotations

from pathlib import Path

from prunedlora import metadata
from prunedlora.loraprune.errors import LorapruneError
from prunedlora.loraprune.groups import decoder_shape, find_projections
from prunedlora.loraprune.masks import GroupMasks
from prunedlora.loraprune.pruner import read_state
from prunedlora.loraprune.slicing import PrunedModel, write_pruned
from prunedlora.modelfacts import ADAPTER_CONFIG_FILE, saved_dtype


def export_pruned(run_dir, out_dir, overwrite: bool = False) -> PrunedModel:
    """Write ``out_dir/base`` (pruned Hugging Face model with the tokenizer), ``out_dir/adapter`` (the
    adapter sliced to it) and ``out_dir/loraprune.json``; nothing is written unless the sliced model
    reproduces the masked one (float64 logits within 1e-4)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise LorapruneError(f"{out_dir} exists and is not empty: choose another folder or pass --overwrite")
    state = read_state(run_dir)
    record = metadata.read_run_record(run_dir)
    adapter_dir = run_dir / metadata.RUN_ADAPTER_DIR
    if not (adapter_dir / ADAPTER_CONFIG_FILE).is_file():
        raise LorapruneError(f"{adapter_dir} holds no PEFT adapter: the run did not finish")
    base = AutoModelForCausalLM.from_pretrained(record.base_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    masks = GroupMasks(decoder_shape(model.config))
    masks.load_state_dict(state["masks"])
    masks.attach(find_projections(model))
    tokenizer = AutoTokenizer.from_pretrained(record.base_model)
    extra = {"run_dir": str(run_dir), "base_model": record.base_model, "loraprune": state["config"]}
    return write_pruned(
        model,
        masks,
        out_dir,
        tokenizer=tokenizer,
        extra=extra,
        dtype=saved_dtype(AutoConfig.from_pretrained(record.base_model)),  # bfloat16 stays bfloat16, exactly
    )
