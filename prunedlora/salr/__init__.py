"""SALR (arXiv 2601.16991): a sparse base with an SVD residual adapter, stored compressed.

mask.py chooses the weights to keep (magnitude or Wanda; unstructured or 2:4), residual.py turns the
pruning residual into the first components of a PEFT LoRA, storage.py writes the bitmap store,
materialise.py turns it back into a dense Hugging Face folder for vLLM, pipeline.py runs the whole
thing behind ``prunedlora sparsify``; recipe.py reads a training recipe's ``salr:`` section and
training.py loads its folder for ``prunedlora train``. Heavy imports happen on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunedlora.lazy import lazy_exports
from prunedlora.salr.config import SparsifyConfig
from prunedlora.salr.errors import CompressedStoreError, SalrError

if TYPE_CHECKING:
    from prunedlora.salr.pipeline import SparsifyResult, sparsify

__all__ = ["CompressedStoreError", "SalrError", "SparsifyConfig", "SparsifyResult", "sparsify"]
__getattr__, _ = lazy_exports(__name__, pipeline=("SparsifyResult", "sparsify"))
