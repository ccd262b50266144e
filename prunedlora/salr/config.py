"""SparsifyConfig: what `prunedlora sparsify` does to a base model, validated on construction.

SALR (arXiv 2601.16991) prunes the frozen base weights of the linear projections and gives back what
pruning loses through a low-rank adapter: the truncated SVD of the pruning residual, concatenated
along the rank with a freshly initialised task LoRA. One record holds every choice so the CLI, Python
callers and the written ``salr.json`` agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prunedlora.modelfacts import ALL_LINEAR
from prunedlora.salr.errors import SalrError

PATTERNS = ("unstructured", "2:4")
MASKS = ("magnitude", "wanda")
RESIDUAL_MODES = ("frozen", "trainable")
# "svd": E's own truncated SVD (the paper's, best in ||E - E_r||); "whitened": the truncation best in the
# output error over the calibration inputs (residual.whitened_residual_factors; one calibration pass)
RESIDUAL_FITS = ("svd", "whitened")


def residual_update_scale(mode: str, lr_scale: float | None = None) -> float:
    """The fraction of the optimizer's step the residual's components take: 0 frozen, 1 trainable, or
    ``lr_scale`` in (0, 1] with ``trainable`` (a residual that learns slower than the task components;
    ``residual.ResidualDamping``). The one check of a residual mode and its scale, wherever they come from."""
    if mode not in RESIDUAL_MODES:
        raise SalrError(f"residual must be one of {', '.join(RESIDUAL_MODES)}, got {mode!r}")
    if lr_scale is None:
        return 0.0 if mode == "frozen" else 1.0
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not 0.0 < lr_scale <= 1.0:
        raise SalrError(f"residual_lr_scale must be a number in (0, 1], got {lr_scale!r}")
    if mode == "frozen":
        raise SalrError(
            "residual_lr_scale applies to a trainable residual (a frozen one takes no step); "
            "set residual: trainable, or drop residual_lr_scale"
        )
    return float(lr_scale)


@dataclass
class SparsifyConfig:
    """How to sparsify and which adapter to start from.

    ``sparsity`` is the fraction of each target weight set to zero; the 2:4 pattern fixes it at 0.5
    (two of every four consecutive input weights of a row). ``residual_rank`` components of the
    pruning residual's SVD and ``task_rank`` PEFT-initialised components make one LoRA of rank
    ``residual_rank + task_rank`` per module, with PEFT's ``lora_alpha`` scaling.
    """

    sparsity: float = 0.5
    pattern: str = "unstructured"
    mask: str = "magnitude"
    residual_rank: int = 16
    task_rank: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = False
    residual: str = "frozen"
    residual_fit: str = "svd"
    # PEFT's all-linear (every projection of the model's family, modelfacts) or a list of module names
    target_modules: list[str] | str = ALL_LINEAR
    calibration_samples: int = 32  # wanda, whitened: sequences in the one calibration pass
    calibration_length: int = 128  # wanda, whitened: tokens per calibration sequence
    seed: int = 0  # the PEFT initialisation of the task components

    def __post_init__(self) -> None:
        from prunedlora.fieldtypes import check_field_types

        check_field_types(self, SalrError)  # types first: the range checks below compare values
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            raise SalrError(f"target_modules must be a list of names or {ALL_LINEAR}, got {self.target_modules!r}")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
        if not 0.0 < self.sparsity < 1.0:
            raise SalrError(f"sparsity must lie strictly between 0 and 1 (a fraction of zeros), got {self.sparsity}")
        if self.pattern not in PATTERNS:
            raise SalrError(f"pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise SalrError(f"the 2:4 pattern zeroes exactly half of each row: use sparsity 0.5, got {self.sparsity}")
        if self.mask not in MASKS:
            raise SalrError(f"mask must be one of {', '.join(MASKS)}, got {self.mask!r}")
        if self.residual not in RESIDUAL_MODES:
            raise SalrError(f"residual must be one of {', '.join(RESIDUAL_MODES)}, got {self.residual!r}")
        if self.residual_fit not in RESIDUAL_FITS:
            raise SalrError(f"residual_fit must be one of {', '.join(RESIDUAL_FITS)}, got {self.residual_fit!r}")
        if self.residual_rank < 0 or self.task_rank < 0 or self.residual_rank + self.task_rank < 1:
            raise SalrError(
                "residual_rank and task_rank must be >= 0 with a positive sum, "
                f"got {self.residual_rank} and {self.task_rank}"
            )
        if self.lora_alpha <= 0:
            raise SalrError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not self.target_modules:
            raise SalrError("target_modules is empty: name the linear projections to sparsify")
        if self.calibration_samples < 1 or self.calibration_length < 1:
            raise SalrError("calibration_samples and calibration_length must be positive")

    @property
    def needs_calibration(self) -> bool:
        """Whether sparsify runs the dense model over calibration text (Wanda's norms, the whitened fit's Gram)."""
        return self.mask == "wanda" or (self.residual_fit == "whitened" and self.residual_rank > 0)

    @property
    def rank(self) -> int:
        """The rank of the one PEFT LoRA: the residual's components first, then the task's."""
        return self.residual_rank + self.task_rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
