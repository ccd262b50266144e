"""Single-turn instruction formats: ``alpaca`` (instruction / input / output, as Stanford Alpaca and
CodeAlpaca ship) and ``prompt-completion`` (TRL's name for a prompt and its completion).

Both become one user turn and one assistant turn, rendered with the model's chat template; values are
stripped of surrounding whitespace, and a row whose answer is empty is skipped (it would only teach
the model to stop).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from prunedlora.formats.base import Example, Format, FormatOptions, register_format, text_value

logger = logging.getLogger(__name__)


def _warn_skipped(where: str, skipped: int, total: int, column: str) -> None:
    if skipped:
        logger.warning("%s: skipped %d of %d rows whose %s is empty", where, skipped, total, column)


@register_format
class Alpaca(Format):
    name = "alpaca"
    columns = ("instruction", "output")
    optional_columns = ("input",)
    detect_priority = 20

    def examples(self, rows: Sequence[dict[str, Any]], where: str, options: FormatOptions) -> list[Example]:
        out, skipped = [], 0
        for i, row in enumerate(rows):
            output = text_value(row["output"], "output", where, i).strip()
            if not output:
                skipped += 1
                continue
            prompt = text_value(row["instruction"], "instruction", where, i).strip()
            extra = str(row.get("input") or "").strip()
            if extra:
                prompt = f"{prompt}\n\n{extra}"
            out.append(Example(prompt=prompt, response=output, index=i))
        _warn_skipped(where, skipped, len(rows), "output")
        return out


@register_format
class PromptCompletion(Format):
    name = "prompt-completion"
    columns = ("prompt", "completion")
    detect_priority = 20

    def examples(self, rows: Sequence[dict[str, Any]], where: str, options: FormatOptions) -> list[Example]:
        out, skipped = [], 0
        for i, row in enumerate(rows):
            completion = text_value(row["completion"], "completion", where, i).strip()
            if not completion:
                skipped += 1
                continue
            prompt = text_value(row["prompt"], "prompt", where, i).strip()
            out.append(Example(prompt=prompt, response=completion, index=i))
        _warn_skipped(where, skipped, len(rows), "completion")
        return out
