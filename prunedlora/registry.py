"""A name -> class table, the one way this project lets a method's pluggable parts be added.

A method keeps one ``Registry`` per kind of part (PrunedLoRA's criteria, LoRAPrune's criteria); a part is
a class with a ``name`` (what a recipe says) and optional ``aliases``. Adding one is a class and
``registry.register(cls)``, in any module imported before the recipe is read; an installed package can
offer parts to the command line through an entry-point group instead (``name = "package.module:Class"``),
looked up when a name is not registered yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """The classes registered for one kind of part, by name and alias, in registration order."""

    def __init__(
        self,
        what: str,
        base: T,
        entry_point_group: str | None = None,
        check: Callable[[T], None] | None = None,
        shipped: dict[str, str] | None = None,
    ):
        self.what = what  # for messages: "criterion"
        self.base = base
        self.entry_point_group = entry_point_group
        self.check = check  # raises ValueError for a class the method cannot use
        # name -> "package.module:Class" of parts imported on first use (a core registry may list
        # the stages' parts this way without importing them)
        self.shipped = dict(shipped or {})
        self._classes: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, cls: T) -> T:
        """Make ``cls`` available under its name and aliases; usable as a decorator.

        Registering the same class again is a no-op (a module imported twice); another class under a
        taken name is refused, so a plug-in cannot silently replace a shipped part."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"register() takes a {self.base.__name__} subclass, got {cls!r}")
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{cls.__qualname__} has no name: set the class attribute name = 'my-{self.what}'")
        if self.check is not None:
            self.check(cls)
        aliases = tuple(getattr(cls, "aliases", ()))
        for taken in (name, *aliases):
            held = self._classes.get(self._aliases.get(taken, taken))
            if held is not None and held is not cls:
                raise ValueError(f"{self.what} name {taken!r} is taken by {held.__module__}.{held.__qualname__}")
        self._classes[name] = cls
        self._aliases.update(dict.fromkeys(aliases, name))
        return cls

    def unregister(self, name: str) -> None:
        """Remove a class and its aliases (tests that register temporary ones clean up with it)."""
        cls = self._classes.pop(self._aliases.get(name, name), None)
        if cls is not None:
            for alias in getattr(cls, "aliases", ()):
                self._aliases.pop(alias, None)

    def find(self, name: str) -> T | None:
        """The class registered under ``name`` or an alias of it (a shipped part or an entry point is
        loaded on a miss); None when there is none."""
        if self._aliases.get(name, name) not in self._classes:
            if name in self.shipped:
                self._load(self.shipped[name])
            else:
                self._load_entry_point(name)
        return self._classes.get(self._aliases.get(name, name))

    def names(self) -> tuple[str, ...]:
        """Every name a recipe may use: aliases first, then the classes in registration order (shipped
        parts first)."""
        return (*self._aliases, *dict.fromkeys([*self.shipped, *self._classes]))

    def classes(self) -> list[T]:
        """Every class, the shipped ones imported."""
        for name in self.shipped:
            self.find(name)
        return list(self._classes.values())

    def _load(self, target: str) -> None:
        import importlib

        module, _, attr = target.partition(":")
        self.register(getattr(importlib.import_module(module), attr))

    def _load_entry_point(self, name: str) -> None:
        if self.entry_point_group is None:
            return
        from importlib.metadata import entry_points

        for point in entry_points(group=self.entry_point_group, name=name):
            loaded = point.load()
            if isinstance(loaded, type) and issubclass(loaded, self.base) and loaded.name not in self._classes:
                self.register(loaded)
