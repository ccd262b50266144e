"""Answer parsing for GSM8K: the number a worked solution ends in, compared as people write numbers.

Used wherever an answer is checked (exact match in the quality bench and the demo); one rule, so a
figure means the same in every table.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer number of a GSM8K solution: the first number after the last ``####``, else the
    last number in the text; commas removed and ``18.00`` written ``18``, so exact match compares
    values as written by people. None when the text holds no number."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        number = found[0] if found else None
    else:
        found = _NUMBER.findall(text)
        number = found[-1] if found else None
    if number is None:
        return None
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number in ("-0", ""):
        number = "0"
    return number
