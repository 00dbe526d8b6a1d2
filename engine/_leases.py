"""Leases on run-scoped shared-memory segments (the caller side of the store).

``PayloadStore.dumps(obj, used=...)`` moves large arrays it finds to shared
memory for one run of the processes strategy (a *transient* segment) instead
of for the executor's life. A transient segment is unlinked once both hold:

- no run uses it any more (every run that pickled it has released it), and
- the caller's array is gone (garbage-collected), so that a later map with
  the same array reuses the segment instead of copying it again.

The calibrated-explanations plugin sends fresh per-call arrays to a warm
executor on every ``explain_factual``; kept for the executor's life, they
filled ``/dev/shm`` call after call.

The weakref callback of a collected array may run in any thread, at any
point (inside the garbage collector, while a lock is held), so it only
appends the segment's key to a deque; the store reaps those keys under its
own lock on its next operation.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Any, final

__all__ = ["Leases"]


@dataclass
class _Lease:
    object_id: int
    holder: weakref.ref
    runs: int = 0
    alive: bool = True


@final
class Leases:
    """Bookkeeping of transient segments by key (the store's lock guards it)."""

    def __init__(self) -> None:
        self._leases: dict[str, _Lease] = {}
        self._dead: collections.deque[str] = collections.deque()

    def add(self, key: str, obj: Any) -> weakref.ref:
        """Track the transient segment ``key`` of ``obj``; return its weakref."""
        dead = self._dead
        holder = weakref.ref(obj, lambda _, key=key: dead.append(key))
        self._leases[key] = _Lease(id(obj), holder)
        return holder

    def take(self, key: str, used: set[str]) -> None:
        """Count one more run using ``key`` (once per run's ``used`` set)."""
        lease = self._leases.get(key)
        if lease is not None and key not in used:
            used.add(key)
            lease.runs += 1

    def forget(self, key: str) -> None:
        """Stop tracking ``key`` (the object was shared for the store's life)."""
        self._leases.pop(key, None)

    def release(self, keys: set[str]) -> list[tuple[str, int]]:
        """End one run's use of ``keys``; return ``(key, object id)`` to unlink."""
        out = []
        for key in keys:
            lease = self._leases.get(key)
            if lease is None:
                continue
            lease.runs -= 1
            if lease.runs <= 0 and not lease.alive:
                del self._leases[key]
                out.append((key, lease.object_id))
        return out

    def reap(self) -> list[tuple[str, int]]:
        """Note the arrays collected since; return ``(key, object id)`` to unlink."""
        out = []
        while self._dead:
            key = self._dead.popleft()
            lease = self._leases.get(key)
            if lease is None:
                continue
            lease.alive = False
            if lease.runs <= 0:
                del self._leases[key]
                out.append((key, lease.object_id))
        return out

    def clear(self) -> None:
        self._leases.clear()
        self._dead.clear()
