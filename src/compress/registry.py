"""A small name -> object registry: a dict plus a decorator, strict about names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from compress.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. Duplicate registration and unknown look-ups raise.

    Args:
        kind: what is registered ("metric", "pass"); used in error messages.
        flag: the CLI flag that selects an entry; used in the hint of an unknown name.
    """

    def __init__(self, kind: str, *, flag: str | None = None) -> None:
        self.kind = kind
        self.flag = flag
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``."""

        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """The entry called ``name``; ConfigError listing the valid names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(self.names())
            hint = f"use {self.flag} with one of: {valid}" if self.flag else f"use one of: {valid}"
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {valid}", hint=hint) from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
