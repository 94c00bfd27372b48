"""Eviction policies for the bounded memory tiers. A policy only orders keys; tiers own data."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Protocol


class EvictionPolicy(Protocol):
    def inserted(self, key: Hashable) -> None: ...
    def accessed(self, key: Hashable) -> None: ...
    def removed(self, key: Hashable) -> None: ...
    def victim(self) -> Hashable | None: ...


class LRUPolicy:
    """Least recently used first. Not thread-safe: the owning tier holds its lock."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def inserted(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def accessed(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self) -> Hashable | None:
        return next(iter(self._order), None)
