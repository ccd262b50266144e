"""Type checks for the dataclass configs, read from their own annotations.

Why: a recipe is YAML, so a value of the wrong type (``r0: "abc"``, ``target_rank: [1]``,
``prune: "no"``) arrives intact and would otherwise surface later as a ``TypeError`` deep in a
comparison, or not at all (``bool("no")`` is True). Checking each field against the type its
dataclass declares keeps one statement of each type (the annotation) and gives Python users the same
error as the CLI. The annotations are strings (``from __future__ import annotations``), so only the
few spellings the configs use are understood; an unknown spelling is not checked.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)


def _is_str_dict(value: Any, values=lambda v: True) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and values(v) for k, v in value.items())


# annotation spelling -> (check, what the message says a value must be)
_CHECKS = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "Path": (lambda v: isinstance(v, os.PathLike), "a path"),
    "None": (lambda v: v is None, "null"),
    "list[str]": (_is_str_list, "a list of names"),
    "dict[str, Any]": (_is_str_dict, "a mapping"),
    "dict[str, int]": (lambda v: _is_str_dict(v, _is_int), "a mapping of names to integers"),
    "dict[str, float]": (lambda v: _is_str_dict(v, _is_number), "a mapping of names to numbers"),
}


def type_problem(name: str, annotation: str, value: Any) -> str | None:
    """Why ``value`` does not fit ``annotation`` (e.g. ``"float | None"``), or None when it does."""
    options = [part.strip() for part in annotation.split("|")]
    if any(part not in _CHECKS for part in options):
        return None
    if any(_CHECKS[part][0](value) for part in options):
        return None
    wanted = " or ".join(_CHECKS[part][1] for part in options)
    return f"{name} must be {wanted}, got {value!r} ({type(value).__name__})"


def check_field_types(config: Any, error: type[Exception]) -> None:
    """Raise ``error`` naming the first field of the dataclass ``config`` whose value has the wrong type."""
    for f in fields(config):
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        problem = type_problem(f.name, annotation, getattr(config, f.name))
        if problem is not None:
            raise error(problem)
