"""export stage: compact pruned LoRA adapters into dense PEFT adapters that PEFT and vLLM load exactly.

Heavy imports (torch, PEFT, transformers) happen when a function is first used, so importing the
package (and ``prunedlora --help``) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prunedlora.export.errors import ExportError

if TYPE_CHECKING:
    from prunedlora.export.exporter import ExportResult, export_adapter
    from prunedlora.export.inspection import inspect_adapter

__all__ = ["ExportError", "ExportResult", "export_adapter", "inspect_adapter"]

_LAZY = {
    "ExportResult": "prunedlora.export.exporter",
    "export_adapter": "prunedlora.export.exporter",
    "inspect_adapter": "prunedlora.export.inspection",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
