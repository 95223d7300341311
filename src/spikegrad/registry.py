"""One registry type for everything a config names: surrogates, neurons, models, losses,
methods, datasets, training callbacks.

    from spikegrad.surrogate import SURROGATES

    @SURROGATES.register("fast-sigmoid")
    class FastSigmoid(Surrogate): ...

    SURROGATES.get("fast-sigmoid")      # the class
    SURROGATES.names()                  # every registered name, sorted

A user registers their own entry the same way, without editing the package: config
validation and ``spikegrad list`` read the registries, so a new name is accepted
everywhere at once. Names are lowercase. An entry may be given as the string
``"package.module:attribute"``: it is imported on first ``get`` (so a registry never
has to import the module that defines an entry, which may import the registry's own).
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """``name -> entry`` (a class or a factory) for one kind of thing (``kind``: how error
    messages name it, e.g. ``"surrogate"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, entry: T | str | None = None, *,
                 replace: bool = False) -> T | str | Callable[[T], T]:
        """Register ``entry`` (or its ``"module:attribute"`` path) under ``name``; without
        ``entry``, a decorator that does.

        A name taken already is refused unless ``replace`` (a deliberate override).
        """
        if not isinstance(name, str) or not name or name != name.lower():
            raise ValueError(f"a {self.kind} name must be a non-empty lowercase string, got {name!r}")

        def add(obj: T | str) -> T | str:
            if name in self._entries and not replace and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered already; pass replace=True to override it")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        """The entry of ``name``, or one ``ValueError`` listing the known names (and the closest)."""
        key = name.lower() if isinstance(name, str) else name
        if key in self._entries:
            entry = self._entries[key]
            if isinstance(entry, str):  # "module:attribute", imported once
                module, _, attribute = entry.partition(":")
                entry = self._entries[key] = getattr(importlib.import_module(module), attribute)
            return entry
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {self.kind} {name!r}{hint} (expected one of {', '.join(self.names())})")

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
