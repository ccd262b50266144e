"""Training and evaluation data in the formats people already keep it in, read through ``datasets``.

A *format* turns rows (dicts, one per record of a JSON/JSONL, CSV/TSV, Parquet file, a
``save_to_disk`` folder or a hub data set) into :class:`Example`s: ``chat`` (a ``messages`` list),
``alpaca`` (instruction / input / output), ``prompt-completion`` (TRL's name), ``text`` (plain
text, every token learned) and ``classification`` (a text and a label word). The built-in tasks
(``prunedlora.tasks``) are presets of these: their columns, templates and labels, read by the same
code. Adding a format is one class in one module, registered with :func:`register_format`.
"""

from prunedlora.formats.base import (
    FORMATS,
    DataError,
    Example,
    Format,
    FormatOptions,
    detect_format,
    get_format,
    register_format,
)
from prunedlora.formats.source import read_rows

# the built-in formats register themselves on import
from prunedlora.formats import chat, classification, instruction, text  # noqa: E402,F401  isort: skip

__all__ = [
    "FORMATS",
    "DataError",
    "Example",
    "Format",
    "FormatOptions",
    "detect_format",
    "get_format",
    "read_rows",
    "register_format",
]
