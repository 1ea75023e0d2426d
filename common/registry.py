"""Entries registered by name where they are defined (losses, group builders, methods), so that no table is
kept in step by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F")


class Registry(dict[str, F], Generic[F]):
    """name -> entry; `@REGISTRY.register(name)` adds one and refuses a name taken twice."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self[name] = fn
            return fn

        return add
