"""Values derived from an object that never changes (a frozen model: a node's parsed topology), kept while the object
lives. Like nodes share one parsed topology (``model._node_topology``), so what is computed from it — its product,
its dies' places, a row's topology columns per free set, the dies chosen per free set — is computed once for all of
them.

Keyed by the object's identity: frozen pydantic models hash by value, which costs more than the lookup saves. An
object's entries go with it (a weakref finalizer runs as the object is freed, before its id can be another
object's), so no entry ever answers for another object, and nothing keeps alive a topology that no node holds any
more (the old shape of these memos, a dict by ``id()`` holding its object and emptied when full, kept up to 4,096
dead topologies, ~76 MB, and recomputed everything once a cluster had more distinct topologies than that).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

PER_OBJECT = 4096
"""Entries kept per object (its keys: free sets and the like); emptied when full."""


class ObjectMemo(Generic[V]):
    """``get(obj, key, compute)``: ``compute()`` once per live ``obj`` and ``key``. Safe from any thread (each step
    is one dict operation under the GIL; a finalizer may run during another object's lookup)."""

    def __init__(self, per_object: int = PER_OBJECT):
        self.per_object = per_object
        self._entries: dict[int, dict[Hashable, V]] = {}

    def get(self, obj: object, key: Hashable, compute: Callable[[], V]) -> V:
        kept = self._entries.get(id(obj))
        if kept is None:
            kept = self._entries[id(obj)] = {}
            weakref.finalize(obj, self._entries.pop, id(obj), None)
        else:
            found = kept.get(key, _MISSING)
            if found is not _MISSING:
                return found  # type: ignore[return-value]
        value = compute()
        if len(kept) >= self.per_object:
            kept.clear()
        kept[key] = value
        return value

    def clear(self) -> None:
        """Forget every value (tests: recompute with nothing kept). Objects seen before get new entries."""
        for kept in list(self._entries.values()):
            kept.clear()

    def __len__(self) -> int:
        """Objects with entries."""
        return len(self._entries)


_MISSING = object()
