"""Starting SALR training from a ``sparsify`` folder: base + adapter, with the residual frozen or not.

The adapter's first ``residual_rank`` components are the pruning residual's SVD. ``residual: frozen``
keeps them fixed (SALR's default: the residual repairs the base, the task components learn the task);
``trainable`` lets the optimizer move them too, at the task's learning rate or, with
``residual_lr_scale``, at that fraction of it. Both are ``ResidualDamping``: frozen, gradients of those
components are zeroed, and after each optimizer step their saved values are written back (AdamW's
decoupled weight decay moves a parameter even with a zero gradient); damped, they are saved before
each step and the step scaled after it. With transformers' Trainer these run from
``callback.ResidualDampingCallback``'s ``on_pre_optimizer_step`` and ``on_optimizer_step``, around
``optimizer.step()``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunedlora.salr.config import residual_update_scale
from prunedlora.salr.errors import SalrError
from prunedlora.salr.residual import ResidualDamping


def read_record(salr_dir: str | os.PathLike) -> dict:
    from prunedlora.salr.pipeline import RECORD_FILE

    path = Path(salr_dir) / RECORD_FILE
    try:
        record = json.loads(path.read_text())
        record["config"]["residual_rank"], record["config"]["residual"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise SalrError(f"{path} is missing or damaged ({err}); run `prunedlora sparsify` again") from err
    return record


def load_for_training(
    salr_dir: str | os.PathLike,
    dtype: str = "float32",
    residual: str | None = None,
    residual_lr_scale: float | None = None,
):
    """(PEFT model over OUT_DIR/base with OUT_DIR/adapter trainable, ResidualDamping or None).

    ``residual`` overrides the mode sparsify recorded (``frozen`` or ``trainable``);
    ``residual_lr_scale`` (trainable only) trains the residual at that fraction of the learning rate.
    None comes back for a residual trained like the rest, which needs nothing.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prunedlora.salr.pipeline import ADAPTER_DIR, BASE_DIR

    salr_dir = Path(salr_dir)
    config = read_record(salr_dir)["config"]
    scale = residual_update_scale(residual or config["residual"], residual_lr_scale)
    base = AutoModelForCausalLM.from_pretrained(salr_dir / BASE_DIR, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(base, salr_dir / ADAPTER_DIR, is_trainable=True)
    damping = ResidualDamping(model, config["residual_rank"], scale=scale) if scale < 1.0 else None
    return model, damping


@dataclass
class SalrSource:
    """The sparsify folder a ``salr:`` recipe trains from, with what the run directory records of it."""

    dir: Path
    record: dict[str, Any]
    residual: str  # the mode this run trains with: the recipe's, else what sparsify recorded
    residual_lr_scale: float | None = None  # the recipe's: a trainable residual's fraction of the learning rate

    @property
    def base_dir(self) -> Path:
        from prunedlora.salr.pipeline import BASE_DIR

        return (self.dir / BASE_DIR).resolve()

    def method(self):
        """The PrunedLoRA method record of the folder's adapter (full rank, never pruned): the runner's
        rank bookkeeping and the run record describe the adapter with it, and export checks against it."""
        from prunedlora.rank.config import PrunedLoraConfig

        config = self.record["config"]
        rank = int(config["residual_rank"]) + int(config["task_rank"])
        return PrunedLoraConfig(
            r0=rank,
            lora_alpha=float(config["lora_alpha"]),
            use_rslora=bool(config["use_rslora"]),
            target_modules=list(config["target_modules"]),
            target_rank=float(rank),
        )

    def provenance(self) -> dict[str, Any]:
        """What the run record keeps of the source: enough to find it again and to know what it was."""
        return {
            "dir": str(self.dir.resolve()),
            "base": str(self.base_dir),
            "source_model": self.record.get("source_model"),
            "residual": self.residual,
            "residual_lr_scale": self.residual_lr_scale,
            "config": self.record["config"],
            "bytes": self.record.get("bytes", {}),
        }


def prepare_source(section, model_dir: str | os.PathLike) -> SalrSource:
    """The folder of a ``salr:`` section (``prunedlora.salr.recipe.SalrSection``), made first with its
    ``sparsify`` options when absent, and checked to come from ``model_dir`` (the recipe's model)."""
    from prunedlora.salr.pipeline import sparsify

    if not section.exists():
        section.check_folder()  # no folder and no options: the recipe's one-line refusal
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SalrError(
                f"salr.dir {section.dir} does not exist yet; with several processes run "
                f"`prunedlora sparsify MODEL {section.dir}` first so that one process writes it"
            )
        sparsify(model_dir, section.dir, section.sparsify, calibration=section.calibration)
    else:
        section.check_folder()
    record = read_record(section.dir)
    made_from = record.get("source_model")
    if made_from and Path(made_from).resolve() != Path(model_dir).resolve():
        raise SalrError(
            f"salr.dir {section.dir} was sparsified from {made_from}, not from the recipe's model {model_dir}; "
            "set model to the one it was made from, or name another salr.dir"
        )
    residual = section.residual or record["config"]["residual"]
    residual_update_scale(residual, section.residual_lr_scale)  # a scale on a folder recorded frozen: refused
    return SalrSource(
        dir=Path(section.dir), record=record, residual=residual, residual_lr_scale=section.residual_lr_scale
    )
