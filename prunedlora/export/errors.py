"""The one error type of the export stage."""

from __future__ import annotations

from prunedlora.errors import PrunedLoraError


class ExportError(PrunedLoraError):
    """An input that cannot be exported, or an export whose check failed; nothing was written."""
