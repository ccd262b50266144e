"""SALR behind the method seam (``prunedlora.method``): training starts from a ``prunedlora sparsify``
folder (a sparse base, and an adapter whose first components repair it) instead of the dense model.

The adapter's shape (rank, alpha, targets) is the folder's, so the run's ``method`` becomes the folder's
and a recipe that sets it is refused; the run directory's base model is the materialised sparse base,
and its record keeps the folder's provenance (export reads it to refuse serving on the dense model).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from prunedlora.errors import PrunedLoraError
from prunedlora.method import Method

logger = logging.getLogger(__name__)


class Salr(Method):
    name = "salr"
    section = "salr"
    prune_refusal = (
        "a salr recipe trains the sparsify folder's adapter at its full rank: set prune: false "
        "(rank pruning of that adapter is not supported)"
    )

    @classmethod
    def parse_section(cls, values: Any):
        from prunedlora.salr.errors import SalrError
        from prunedlora.salr.recipe import SalrSection

        try:
            return SalrSection.from_dict(values)
        except PrunedLoraError as err:
            raise SalrError(str(err) if str(err).startswith("salr") else f"salr: {err}") from None

    @classmethod
    def check_recipe(cls, raw: dict[str, Any]) -> None:
        from prunedlora.salr.recipe import ADAPTER_SHAPE_OPTIONS

        super().check_recipe(raw)
        method = raw.get("method") if isinstance(raw.get("method"), dict) else {}
        shape = sorted(set(method) & set(ADAPTER_SHAPE_OPTIONS))
        if shape:
            raise PrunedLoraError(
                f"method.{shape[0]} does not apply to a salr recipe: the adapter's rank, alpha and targets are the "
                "sparsify folder's (set them under salr.sparsify: residual_rank, task_rank, lora_alpha, target_modules)"
            )

    def build_model(self, model_dir: Path, build_lora) -> Any:
        """The sparsify folder (made first if the section says how) loaded for training."""
        from prunedlora.salr.training import load_for_training, prepare_source

        self.model_dir = model_dir
        source = prepare_source(self.options, model_dir)
        model, self.damping = load_for_training(
            source.dir,
            dtype=self.recipe.training.dtype,
            residual=source.residual,
            residual_lr_scale=source.residual_lr_scale,
        )
        scaled = "" if source.residual_lr_scale is None else f" at {source.residual_lr_scale:g} x the learning rate"
        logger.info(
            "SALR: training %s over the sparse base %s, residual %s%s",
            source.dir,
            source.base_dir,
            source.residual,
            scaled,
        )
        self.source = source
        self.recipe = replace(self.recipe, method=source.method())
        return model

    def start(self, model: Any, max_steps: int) -> list[Any]:
        from prunedlora.salr.callback import ResidualDampingCallback

        callbacks = super().start(model, max_steps)
        return [*callbacks, *([ResidualDampingCallback(self.damping)] if self.damping is not None else [])]

    @property
    def base_model_dir(self) -> Path:
        return self.source.base_dir  # the adapter belongs to the materialised sparse base

    def record(self) -> dict[str, Any]:
        return {"salr_source": self.source.provenance()}
