"""What every format shares: the example record, the format protocol and its registry, and the
column mapping and detection that pick a format from a file's columns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from prunedlora.errors import PrunedLoraError


class DataError(PrunedLoraError):
    """A data file or data configuration that cannot be read as asked, with how to fix it."""


class Where(str):
    """A data source's name for messages, which also knows where row ``i`` is: ``file:line`` for
    line-based files (JSON Lines, CSV/TSV), ``name row N`` otherwise."""

    lines: list[int] | None = None

    @classmethod
    def lined(cls, name: str, lines: list[int]) -> Where:
        where = cls(name)
        where.lines = lines
        return where


def at(where: str, row: int) -> str:
    """Where row ``row`` (0-based) of ``where`` is, for a message."""
    lines = getattr(where, "lines", None)
    if lines is not None and row < len(lines):
        return f"{where}:{lines[row]}"
    return f"{where} row {row + 1}"


@dataclass(frozen=True)
class Example:
    """One training or evaluation example: a final user turn (``prompt``) and its reply (``response``).

    ``history`` holds the conversation before the final exchange (an optional system message, then
    user and assistant turns alternating), as ``{"role", "content"}`` dicts: a chat file's earlier
    turns, or a system prompt. ``label`` is the class word for classification. ``plain`` marks raw
    text (the ``text`` format): ``response`` is the text, rendered without a chat template, every
    token learned. ``index`` is the record's position in its source file (0-based, header
    excluded), so splits can be checked against the file.
    """

    prompt: str
    response: str
    label: str | None = None
    index: int = -1
    history: tuple[dict[str, str], ...] = ()
    plain: bool = False

    @property
    def messages(self) -> list[dict[str, str]]:
        """The whole conversation as the chat template takes it."""
        return [
            *self.history,
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.response},
        ]


@dataclass(frozen=True)
class FormatOptions:
    """What a format may need beyond the rows: set from ``DataConfig`` (``labels``, ``template``)
    or by a task preset. ``labels`` maps a label value as the file spells it to the word the model
    learns to answer with; ``template`` is a prompt with ``{column}`` placeholders."""

    labels: dict[str, str] | None = None
    template: str | None = None


class Format:
    """A way of reading rows into examples. Subclasses set ``name``, ``columns`` (the columns a row
    must have, by their canonical names) and implement :meth:`examples`; ``detect_priority`` orders
    detection (the most specific column set first)."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]
    optional_columns: ClassVar[tuple[str, ...]] = ()
    detect_priority: ClassVar[int] = 0

    def examples(self, rows: Sequence[dict[str, Any]], where: str, options: FormatOptions) -> list[Example]:
        raise NotImplementedError

    def required_columns(self, options: FormatOptions) -> tuple[str, ...]:
        """The columns a row must have with these options (a classification template may name others)."""
        return self.columns

    def check_options(self, options: FormatOptions, where: str) -> None:
        """Refuse options that cannot work before any row is read (e.g. a template without a placeholder)."""


FORMATS: dict[str, Format] = {}


def register_format(cls: type[Format]) -> type[Format]:
    """Class decorator: make ``cls`` available as ``data.format: <cls.name>``."""
    FORMATS[cls.name] = cls()
    return cls


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise DataError(f"unknown data format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(found: Sequence[str], where: str) -> Format:
    """The format whose columns a file has (the most specific first), or a DataError naming them."""
    for fmt in sorted(FORMATS.values(), key=lambda f: -f.detect_priority):
        if all(c in found for c in fmt.columns):
            return fmt
    wanted = "; ".join(f"{f.name}: {', '.join(f.columns)}" for f in FORMATS.values())
    raise DataError(
        f"{where} has columns {', '.join(found) or 'none'}, which fit no data format ({wanted}); "
        "rename them with data.columns (e.g. columns: {messages: conversations}) or set data.format"
    )


def check_columns(fmt: Format, found: Sequence[str], where: str, options: FormatOptions | None = None) -> None:
    needed = fmt.required_columns(options or FormatOptions())
    missing = [c for c in needed if c not in found]
    if missing:
        raise DataError(
            f"{where} lacks column(s) {', '.join(missing)} that format {fmt.name} needs "
            f"({', '.join(needed)}); found {', '.join(found) or 'none'}: rename with data.columns "
            f"(e.g. columns: {{{missing[0]}: <your column>}}) or pick the format that fits"
        )


def rename_columns(
    rows: list[dict[str, Any]], columns: dict[str, str] | None, found: Sequence[str], where: str
) -> list[dict[str, Any]]:
    """Rows with the file's columns renamed to the canonical names ``columns`` maps them from
    (``{canonical: file column}``); a mapped column the file lacks is refused, naming those found."""
    if not columns:
        return rows
    absent = [source for source in columns.values() if source not in found]
    if absent:
        raise DataError(
            f"{where} lacks column(s) {', '.join(absent)} (data.columns maps them); found {', '.join(found) or 'none'}: "
            "is this the right file, or are the columns named otherwise?"
        )
    inverse = {source: canonical for canonical, source in columns.items()}
    return [{inverse.get(k, k): v for k, v in row.items()} for row in rows]


def text_value(value: Any, column: str, where: str, row: int) -> str:
    """A cell that must be text (numbers are written as text), refused when it is missing or a structure."""
    if value is None:
        raise DataError(f"{at(where, row)}: column {column} is empty; fill it or drop the row")
    if isinstance(value, (dict, list)):
        raise DataError(f"{at(where, row)}: column {column} holds a {type(value).__name__}, expected text")
    return str(value)
