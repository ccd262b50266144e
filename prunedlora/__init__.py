"""PrunedLoRA: LoRA adapters that start at rank r0 and are pruned to variable per-module ranks."""

from prunedlora.rank.config import PrunedLoraConfig

__all__ = ["PrunedLoraConfig"]
__version__ = "0.1.0"
