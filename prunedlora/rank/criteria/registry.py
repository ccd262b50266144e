"""The criteria a recipe's ``method.criterion`` may name (a ``prunedlora.registry.Registry``).

The shipped ones register themselves in ``prunedlora.rank.criteria``; yours does the same in its own
module, imported before the config is built, or through the entry-point group ``prunedlora.criteria``
of an installed package (then the command line finds it too).
"""

from __future__ import annotations

from prunedlora.rank.criteria.base import Criterion
from prunedlora.registry import Registry

RECOVERIES = ("none", "compensate", "newton")


def _check(cls: type[Criterion]) -> None:
    if cls.default_recovery not in RECOVERIES:
        raise ValueError(
            f"{cls.__qualname__}.default_recovery must be one of {', '.join(RECOVERIES)}, got {cls.default_recovery!r}"
        )


CRITERIA: Registry[type[Criterion]] = Registry("criterion", Criterion, "prunedlora.criteria", _check)
register = CRITERIA.register
unregister = CRITERIA.unregister
find = CRITERIA.find
names = CRITERIA.names
