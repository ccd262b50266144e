"""Lazy package exports (PEP 562): a package names what it offers without importing its modules.

Why: ``prunedlora --help`` and ``import prunedlora.serve`` must not pay for torch, PEFT or vLLM; a
name is imported from its module the first time it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, **modules: tuple[str, ...]) -> tuple[Callable[[str], Any], list[str]]:
    """(``__getattr__``, ``__all__``) for ``package``, whose submodule ``m`` offers the names ``modules[m]``.

    In a package's ``__init__``::

        __getattr__, __all__ = lazy_exports(__name__, exporter=("export_adapter",), inspection=("inspect_adapter",))
    """
    owner = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in owner:
            return getattr(importlib.import_module(f"{package}.{owner[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, sorted(owner)
