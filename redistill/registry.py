"""Name -> callable registries for everything that varies (architectures, losses, backends...)."""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, List, TypeVar

from redistill.errors import UserError, did_you_mean

T = TypeVar("T")

#: every registry created, by kind; a test walks them all
ALL: Dict[str, "Registry"] = {}


class Registry(Generic[T]):
    """A named collection filled by the ``@registry.register("name")`` decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}
        ALL[kind] = self

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its entry (a test that registers a temporary entry cleans up with this)."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}." + did_you_mean(name, self._items)) from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def values(self) -> List[T]:
        """Every entry, in the order of ``names()``."""
        return [self._items[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
