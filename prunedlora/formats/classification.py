"""``classification``: a text column, a label column and the label words the model answers with.

Trained on the label word as the assistant's reply to a prompt made from ``template`` (placeholders
name columns, ``{text}`` by default); scored by which label word is most likely (``bench/scoring``).
The label words come from ``labels`` (a list of the values as the file writes them, or a mapping
value -> word) or, when none are given, every distinct label of the training file, sorted.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from prunedlora.formats.base import DataError, Example, Format, FormatOptions, at, register_format, text_value


def template_fields(template: str) -> list[str]:
    """The ``{name}`` placeholders of a template; a malformed one is a DataError."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise DataError(f"template {template!r} is not a valid format string ({err}); write {{text}} once") from None


def default_template(words: Sequence[str]) -> str:
    """The question put after the text when the recipe gives none: the instruction last, so cutting a
    long text from its start never removes what the label answers."""
    choices = ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
    choices = choices.replace("{", "{{").replace("}", "}}")
    return "{text}\n\nAnswer with one word: " + choices + "."


def label_words(labels: Any, where: str) -> dict[str, str]:
    """``labels`` as given in a recipe (a list, or a mapping value -> word) as ``{file value: word}``."""
    if isinstance(labels, dict):
        mapping = {str(k): str(v) for k, v in labels.items()}
    elif isinstance(labels, (list, tuple)):
        mapping = {str(v): str(v) for v in labels}
    else:
        raise DataError(f"{where}: labels must be a list of label words or a mapping value -> word, got {labels!r}")
    words = list(mapping.values())
    if len(set(words)) < 2 or len(set(words)) != len(words):
        raise DataError(f"{where}: labels must name at least two different words, each once; got {labels!r}")
    if any(not w.strip() for w in words):
        raise DataError(f"{where}: a label word is empty; got {labels!r}")
    return mapping


@register_format
class Classification(Format):
    name = "classification"
    columns = ("text", "label")
    detect_priority = 10

    def required_columns(self, options: FormatOptions) -> tuple[str, ...]:
        return ("label", *template_fields(options.template)) if options.template else self.columns

    def check_options(self, options: FormatOptions, where: str) -> None:
        if options.template is not None and not template_fields(options.template):
            raise DataError(
                f"{where}: template {options.template!r} has no placeholder; put {{text}} where the text goes"
            )

    def examples(self, rows: Sequence[dict[str, Any]], where: str, options: FormatOptions) -> list[Example]:
        mapping = options.labels
        if mapping is None:
            mapping = label_words(
                sorted({text_value(r["label"], "label", where, i) for i, r in enumerate(rows)}), where
            )
        template = options.template or default_template(list(mapping.values()))
        fields = template_fields(template)
        if not fields:
            raise DataError(f"{where}: template {template!r} has no placeholder; put {{text}} where the text goes")
        out = []
        for i, row in enumerate(rows):
            value = text_value(row["label"], "label", where, i).strip()
            if value not in mapping:
                raise DataError(
                    f"{at(where, i)} has label {value!r}, not one of the label words "
                    f"{', '.join(mapping)}; fix the row or add it to data.labels"
                )
            missing = [f for f in fields if f not in row]
            if missing:
                raise DataError(
                    f"{where}: template placeholder {{{missing[0]}}} names no column; columns: {', '.join(row)}"
                )
            values = {f: text_value(row[f], f, where, i).strip() for f in fields}
            word = mapping[value]
            out.append(Example(prompt=template.format(**values), response=word, label=word, index=i))
        return out
