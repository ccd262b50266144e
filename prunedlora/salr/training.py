"""Starting SALR training from a ``sparsify`` folder: base + adapter, with the residual frozen or not.

The adapter's first ``residual_rank`` components are the pruning residual's SVD. ``residual: frozen``
keeps them fixed (SALR's default: the residual repairs the base, the task components learn the task);
``trainable`` lets the optimizer move them too. Freezing is ``ResidualFreeze``: gradients of those
components are zeroed, and after each optimizer step their saved values are written back (AdamW's
decoupled weight decay moves a parameter even with a zero gradient). With transformers' Trainer the
write-back runs from ``FrozenResidualCallback.on_step_end``, which comes after ``optimizer.step()``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from prunedlora.salr.errors import SalrError
from prunedlora.salr.residual import ResidualFreeze


def read_record(salr_dir: str | os.PathLike) -> dict:
    from prunedlora.salr.pipeline import RECORD_FILE

    path = Path(salr_dir) / RECORD_FILE
    try:
        record = json.loads(path.read_text())
        record["config"]["residual_rank"], record["config"]["residual"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SalrError(f"{path} is missing or damaged ({err}); run `prunedlora sparsify` again") from err
    return record


def load_for_training(salr_dir: str | os.PathLike, dtype: str = "float32", residual: str | None = None):
    """(PEFT model over OUT_DIR/base with OUT_DIR/adapter trainable, ResidualFreeze or None).

    ``residual`` overrides the mode sparsify recorded (``frozen`` or ``trainable``).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prunedlora.salr.pipeline import ADAPTER_DIR, BASE_DIR

    salr_dir = Path(salr_dir)
    config = read_record(salr_dir)["config"]
    mode = residual or config["residual"]
    if mode not in ("frozen", "trainable"):
        raise SalrError(f"residual must be frozen or trainable, got {mode!r}")
    base = AutoModelForCausalLM.from_pretrained(salr_dir / BASE_DIR, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(base, salr_dir / ADAPTER_DIR, is_trainable=True)
    freeze = ResidualFreeze(model, config["residual_rank"]) if mode == "frozen" else None
    return model, freeze


class FrozenResidualCallback(TrainerCallback):
    """Writes the frozen residual back after every optimizer step of a transformers Trainer."""

    def __init__(self, freeze: ResidualFreeze):
        self.freeze = freeze

    def on_step_end(self, args, state, control, **kwargs):
        self.freeze.restore()
