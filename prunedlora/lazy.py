"""Lazy package exports (PEP 562): a package names what it offers without importing its modules.

Why: ``prunedlora --help`` and ``import prunedlora.serve`` must not pay for torch, PEFT or vLLM; a
name is imported from its module the first time it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from ``package.exports[name]``.

    Use in a package's ``__init__``: ``__getattr__ = lazy_exports(__name__, _EXPORTS)``, with
    ``_EXPORTS`` mapping each public name to its submodule (``{"export_adapter": "exporter"}``).
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
