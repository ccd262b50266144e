"""``text``: plain text, every token learned, no chat template (continued pretraining; LoRAPrune's
recovery text). ``train/data.py`` packs the texts into ``max_length`` blocks or cuts each to it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prunedlora.formats.base import Example, Format, FormatOptions, register_format, text_value


@register_format
class Text(Format):
    name = "text"
    columns = ("text",)
    detect_priority = 0  # the least specific: a classification file has a text column too

    def examples(self, rows: Sequence[dict[str, Any]], where: str, options: FormatOptions) -> list[Example]:
        out = []
        for i, row in enumerate(rows):
            text = text_value(row["text"], "text", where, i)
            if text.strip():
                out.append(Example(prompt="", response=text, index=i, plain=True))
        return out
