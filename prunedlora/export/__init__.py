"""export stage: compact pruned LoRA adapters into dense PEFT adapters that PEFT and vLLM load exactly.

Heavy imports (torch, PEFT, transformers) happen when a function is first used, so importing the
package (and ``prunedlora --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunedlora.export.errors import ExportError
from prunedlora.lazy import lazy_exports

if TYPE_CHECKING:
    from prunedlora.export.exporter import ExportResult, export_adapter
    from prunedlora.export.inspection import inspect_adapter

__all__ = ["ExportError", "ExportResult", "export_adapter", "inspect_adapter"]
__getattr__, _ = lazy_exports(__name__, exporter=("ExportResult", "export_adapter"), inspection=("inspect_adapter",))
