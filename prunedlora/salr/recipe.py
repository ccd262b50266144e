"""The ``salr:`` section of a training recipe: which sparsify folder a run trains from, and how.

Why a section and not a method: SALR changes the *starting point* of training (a sparse base and an
adapter whose first components repair it), not the training loop, so ``prunedlora train`` runs its
usual Trainer on what ``prunedlora sparsify`` wrote. The adapter's shape (rank, alpha, targets) is the
folder's; a recipe that also sets it in ``method`` would be silently ignored, so that is refused.

    salr:
      dir: runs/smollm2-salr-base   # a `prunedlora sparsify` output folder
      residual: frozen              # frozen | trainable; null: what sparsify recorded
      residual_lr_scale: 0.1        # optional, trainable only: the residual learns at 0.1 x the rate
      sparsify: {sparsity: 0.5, residual_rank: 16, task_rank: 8}   # optional: make `dir` first
      calibration: data/task-text.txt   # optional: the Wanda mask's / whitened fit's text

With ``sparsify`` options the folder is made on the first run (from the recipe's model) and reused
after, provided it was made with the same options (and, with ``calibration``, from a text of the same
hash: the mask and the fit depend on it); without them it must already exist. ``calibration`` is
sparsify's ``--calibration``: without it a calibrated folder is made from the default text. Every check
that needs no model runs when the recipe is read, so a wrong section fails before anything loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from prunedlora.modelfacts import ALL_LINEAR
from prunedlora.salr.config import RESIDUAL_MODES, SparsifyConfig, residual_update_scale
from prunedlora.salr.errors import SalrError

# the PrunedLoRA method options that describe the adapter's shape: a salr recipe takes them from the folder
ADAPTER_SHAPE_OPTIONS = ("r0", "lora_alpha", "use_rslora", "target_modules", "lora_dropout")
# sparsify settings that do not change the folder's weights (only the default training mode it records)
_NOT_IN_WEIGHTS = ("residual",)


@dataclass
class SalrSection:
    """A validated ``salr:`` section. ``sparsify`` holds the options to make ``dir`` with, or None."""

    dir: str
    residual: str | None = None
    residual_lr_scale: float | None = None
    sparsify: SparsifyConfig | None = None
    calibration: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SalrSection:
        if not isinstance(data, dict):
            raise SalrError(f"salr must be a mapping of option: value, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(map(str, set(data) - set(known)))
        if unknown:
            raise SalrError(f"unknown salr setting(s): {', '.join(unknown)}; known: {', '.join(known)}")
        folder = data.get("dir")
        if not isinstance(folder, (str, Path)) or not str(folder).strip():
            raise SalrError("salr.dir is missing: name the `prunedlora sparsify` output folder to train from")
        residual = data.get("residual")
        if residual is not None and residual not in RESIDUAL_MODES:
            raise SalrError(f"salr.residual must be one of {', '.join(RESIDUAL_MODES)} (or null), got {residual!r}")
        options = data.get("sparsify")
        config = None
        if options is not None:
            if not isinstance(options, dict):
                raise SalrError(f"salr.sparsify must be a mapping of sparsify options, got {type(options).__name__}")
            allowed = {f.name for f in fields(SparsifyConfig)}
            bad = sorted(map(str, set(options) - allowed))
            if bad:
                raise SalrError(
                    f"unknown salr.sparsify option(s): {', '.join(bad)}; known: {', '.join(sorted(allowed))}"
                )
            try:
                config = SparsifyConfig(**options)
            except SalrError as err:
                raise SalrError(f"salr.sparsify: {err}") from None
        calibration = data.get("calibration")
        if calibration is not None:
            if not isinstance(calibration, (str, Path)) or not str(calibration).strip():
                raise SalrError(f"salr.calibration must name a text file, got {calibration!r}")
            if config is None or not config.needs_calibration:
                raise SalrError(
                    "salr.calibration is read only to make the folder with a wanda mask or the whitened fit: "
                    "give salr.sparsify options with mask: wanda or residual_fit: whitened, or drop it"
                )
            if not Path(calibration).is_file():
                raise SalrError(f"salr.calibration {calibration} is not a file")
            calibration = str(calibration)
        section = cls(
            dir=str(folder),
            residual=residual,
            residual_lr_scale=data.get("residual_lr_scale"),
            sparsify=config,
            calibration=calibration,
        )
        section._check_residual_lr_scale()
        section.check_folder()
        return section

    def _check_residual_lr_scale(self) -> None:
        """The scale against the mode the run will train with where that is known before anything runs: the
        recipe's, else the one a folder still to be made will record from ``sparsify`` (so a refusal comes
        before sparsify's minutes of work). An existing folder's recorded mode is checked when it is read."""
        if self.residual_lr_scale is None:
            return
        mode = self.residual
        if mode is None and self.sparsify is not None and not self.exists():
            mode = self.sparsify.residual
        try:
            residual_update_scale(mode or "trainable", self.residual_lr_scale)
        except SalrError as err:
            raise SalrError(f"salr.{err}") from None

    @property
    def record_path(self) -> Path:
        from prunedlora.salr.pipeline import RECORD_FILE

        return Path(self.dir) / RECORD_FILE

    def exists(self) -> bool:
        return self.record_path.is_file()

    def check_folder(self) -> None:
        """The folder must exist unless ``sparsify`` can make it, and if both, agree with its options."""
        if not self.exists():
            if self.sparsify is None:
                raise SalrError(
                    f"salr.dir {self.dir} holds no sparsify output ({self.record_path.name} missing): run "
                    f"`prunedlora sparsify MODEL {self.dir}` first, or give salr.sparsify options to make it"
                )
            if Path(self.dir).exists() and (not Path(self.dir).is_dir() or any(Path(self.dir).iterdir())):
                raise SalrError(f"salr.dir {self.dir} exists but is no sparsify output; empty it or name another")
            return
        if self.sparsify is not None:
            try:
                record = json.loads(self.record_path.read_text())
                made = record["config"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise SalrError(f"{self.record_path} is damaged ({err}); run `prunedlora sparsify` again") from None
            wanted = {k: v for k, v in self.sparsify.to_dict().items() if k not in _NOT_IN_WEIGHTS}
            # an option missing from the record did not exist when it was written: it was made with the default
            default = SparsifyConfig().to_dict()
            made = {k: made.get(k, default[k]) for k in wanted}
            if wanted.get("target_modules") == ALL_LINEAR and isinstance(made.get("target_modules"), list):
                wanted["target_modules"] = self._all_linear(record)  # the folder records the names it resolved to
            differ = sorted(k for k, v in wanted.items() if made[k] != v)
            if differ:
                shown = ", ".join(f"{k} {made.get(k)!r} (recipe {wanted[k]!r})" for k in differ[:4])
                raise SalrError(
                    f"salr.dir {self.dir} was sparsified with other settings: {shown}; "
                    "remove the folder to remake it, or name another salr.dir"
                )
            if self.calibration is not None:
                self._check_calibration()

    def _all_linear(self, record: dict) -> list[str] | str:
        """What all-linear meant for the model this folder was sparsified from (its copy in the folder
        when the source is gone)."""
        from prunedlora.errors import PrunedLoraError
        from prunedlora.modelfacts import resolve_targets

        for model in (record.get("source_model"), Path(self.dir) / "base"):
            try:
                return resolve_targets(model, ALL_LINEAR)
            except (PrunedLoraError, TypeError):
                continue
        return ALL_LINEAR

    def _check_calibration(self) -> None:
        """A reused folder must come from the text the recipe names (its hash, which sparsify records)."""
        from prunedlora.salr.calibration import read_calibration_text, text_digest

        made = (json.loads(self.record_path.read_text()).get("calibration") or {}).get("sha256")
        wanted = text_digest(read_calibration_text(self.calibration))
        if made != wanted:
            said = "records no calibration text" if made is None else "was calibrated on another text"
            raise SalrError(
                f"salr.dir {self.dir} {said}, not on salr.calibration {self.calibration}; "
                "remove the folder to remake it, or name another salr.dir"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sparsify": None if self.sparsify is None else self.sparsify.to_dict()}
