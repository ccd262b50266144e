"""The criteria a recipe may name: a name -> ``Criterion`` subclass table.

``register`` adds one (the shipped ones register themselves in ``prunedlora.rank.criteria``; yours
does the same in its own module, imported before the config is built). An installed package can also
offer criteria to the command line through the entry-point group ``prunedlora.criteria``
(``name = "package.module:Class"``): a name not registered yet is looked up there before it is refused.
"""

from __future__ import annotations

from prunedlora.rank.criteria.base import Criterion

RECOVERIES = ("none", "compensate", "newton")
ENTRY_POINT_GROUP = "prunedlora.criteria"

_CLASSES: dict[str, type[Criterion]] = {}
_ALIASES: dict[str, str] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    """Make ``cls`` available as ``method.criterion: <cls.name>`` (and its aliases); usable as a decorator.

    Registering the same class again is a no-op (a module imported twice); another class under a taken
    name is refused, so a plug-in cannot silently replace a shipped criterion."""
    if not (isinstance(cls, type) and issubclass(cls, Criterion)):
        raise TypeError(f"register() takes a Criterion subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name.strip():
        raise ValueError(f"{cls.__qualname__} has no name: set the class attribute name = 'my-criterion'")
    if cls.default_recovery not in RECOVERIES:
        raise ValueError(
            f"{cls.__qualname__}.default_recovery must be one of {', '.join(RECOVERIES)}, got {cls.default_recovery!r}"
        )
    for name in (cls.name, *cls.aliases):
        held = _CLASSES.get(_ALIASES.get(name, name))
        if held is not None and held is not cls:
            raise ValueError(f"criterion name {name!r} is taken by {held.__module__}.{held.__qualname__}")
    _CLASSES[cls.name] = cls
    _ALIASES.update(dict.fromkeys(cls.aliases, cls.name))
    return cls


def unregister(name: str) -> None:
    """Remove a criterion and its aliases (tests that register temporary ones clean up with it)."""
    cls = _CLASSES.pop(_ALIASES.get(name, name), None)
    if cls is not None:
        for alias in cls.aliases:
            _ALIASES.pop(alias, None)


def find(name: str) -> type[Criterion] | None:
    """The class registered under ``name`` or an alias of it; None when there is none."""
    canonical = _ALIASES.get(name, name)
    if canonical not in _CLASSES:
        _load_entry_point(name)
        canonical = _ALIASES.get(name, name)
    return _CLASSES.get(canonical)


def names() -> tuple[str, ...]:
    """Every name a recipe may use: aliases first (``obs``), then the criteria in registration order."""
    return (*_ALIASES, *_CLASSES)


def _load_entry_point(name: str) -> None:
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP, name=name):
        loaded = point.load()
        if isinstance(loaded, type) and issubclass(loaded, Criterion) and loaded.name not in _CLASSES:
            register(loaded)
