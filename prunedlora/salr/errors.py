"""The errors of SALR: one line each, naming the file or setting and the fix."""

from __future__ import annotations

from prunedlora.errors import PrunedLoraError


class SalrError(PrunedLoraError):
    """A sparsify setting or input that cannot work; nothing was written."""


class CompressedStoreError(SalrError):
    """A compressed sparse store that is truncated, corrupt, or whose manifest does not describe its
    tensors; nothing was read into a model and nothing was written."""
