"""``chat``: the Hugging Face conversational format, a ``messages`` list of ``{role, content}``.

An optional system message first, then user and assistant turns alternating, ending with an
assistant turn; every assistant turn can be learned (``train/data.py`` labels their spans).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prunedlora.formats.base import DataError, Example, Format, FormatOptions, at, register_format

ROLES = ("system", "user", "assistant")


def check_conversation(messages: Any, where: str, row: int) -> list[dict[str, str]]:
    """The conversation as ``[{role, content}]``, or a DataError naming the row and what is wrong."""
    at_row = at(where, row)
    if not isinstance(messages, list):
        raise DataError(f"{at_row}: messages is a {type(messages).__name__}, expected a list of {{role, content}}")
    turns = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{at_row}: message {k} is not an object with role and content")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{at_row}: message {k} has unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(
                f"{at_row}: message {k} ({role}) has content of type {type(content).__name__}, expected text"
            )
        turns.append({"role": role, "content": content})
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    if not any(t["role"] == "assistant" for t in body):
        raise DataError(f"{at_row}: the conversation has no assistant turn, so nothing to learn; drop the row")
    for k, turn in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise DataError(
                f"{at_row}: roles must alternate user, assistant (after an optional first system message); "
                f"turn {k + len(turns) - len(body)} is {turn['role']}, expected {expected}"
            )
    if body[-1]["role"] != "assistant":
        raise DataError(f"{at_row}: the conversation ends with a user turn that has no reply; drop it or add the reply")
    return turns


@register_format
class Chat(Format):
    name = "chat"
    columns = ("messages",)
    detect_priority = 30

    def examples(self, rows: Sequence[dict[str, Any]], where: str, options: FormatOptions) -> list[Example]:
        out = []
        for i, row in enumerate(rows):
            turns = check_conversation(row["messages"], where, i)
            out.append(
                Example(
                    prompt=turns[-2]["content"],
                    response=turns[-1]["content"],
                    index=i,
                    history=tuple(turns[:-2]),
                )
            )
        return out
