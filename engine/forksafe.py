"""Fork-safe process state: reset hooks run in forked children, and an LRU cache.

A child made by ``os.fork()`` inherits every cache, lock and handle of its
parent, including locks that another parent thread held at the moment of the
fork (the child then deadlocks on first use) and objects that claim to own
shared resources (the child must not release them). ``register_fork_reset``
collects objects and callables, held weakly, that are reset in the child by
one ``os.register_at_fork(after_in_child=...)`` hook, installed lazily on the
first registration so that importing this module has no side effects.

``LRUCache`` is the engine's answer to calibrated-explanations'
``CalibratorCache.forksafe_reset``: bounded by items and bytes, thread-safe,
and emptied automatically in a forked child.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import types
import weakref
from collections.abc import Hashable
from typing import Any, Final, TypeVar, final

from engine.errors import ConfigError

__all__ = ["LRUCache", "register_fork_reset", "unregister_fork_reset"]

_T = TypeVar("_T")

# (weak reference to the target, True when the target's forksafe_reset() is
# called rather than the target itself)
_Entry = tuple["weakref.ref[Any]", bool]

_registry: list[_Entry] = []
_registry_lock = threading.Lock()
_hook_installed = False


def _weak(target: Any) -> _Entry:
    is_method = isinstance(target, types.MethodType)
    call_method = not is_method and callable(getattr(target, "forksafe_reset", None))
    if not (call_method or callable(target)):
        msg = (
            f"register_fork_reset() got {target!r}, which is neither callable nor "
            "has a forksafe_reset() method; pass a function, a bound method or an "
            "object with forksafe_reset()."
        )
        raise TypeError(msg)
    try:
        # A bound method object dies at once; WeakMethod tracks its instance.
        ref = weakref.WeakMethod(target) if is_method else weakref.ref(target)
    except TypeError as exc:
        msg = (
            f"register_fork_reset() cannot hold {target!r} weakly "
            f"({type(target).__name__} does not support weak references); wrap it "
            "in a module-level function, or add '__weakref__' to its __slots__."
        )
        raise TypeError(msg) from exc
    return ref, call_method


def _install_hook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    _hook_installed = True
    # Windows has no fork, hence no register_at_fork: nothing to reset there.
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_reset_in_child)


def register_fork_reset(target: _T) -> _T:
    """Reset ``target`` in every child forked from this process.

    Parameters
    ----------
    target : object or callable
        An object with a ``forksafe_reset()`` method, or a callable taking no
        arguments. It is held by a weak reference: registration never keeps
        it alive, and a collected target is skipped.

    Returns
    -------
    object or callable
        ``target`` itself, so the function can be used as a decorator.

    Raises
    ------
    TypeError
        ``target`` is neither callable nor has ``forksafe_reset()``, or it
        cannot be referenced weakly.

    Notes
    -----
    Resets run in registration order in the child, right after ``fork()``,
    before any other code of the child. They must be quick and must not
    acquire locks that parent threads may have held: replace such locks.
    """
    entry = _weak(target)
    with _registry_lock:
        _install_hook()
        _registry[:] = [item for item in _registry if item[0]() is not None]
        _registry.append(entry)
    return target


def unregister_fork_reset(target: Any) -> None:
    """Stop resetting ``target`` in forked children (no error if absent)."""
    with _registry_lock:
        _registry[:] = [
            item
            for item in _registry
            if not _same(item[0](), target) and item[0]() is not None
        ]


def _same(current: Any, target: Any) -> bool:
    # Identity, except for bound methods: WeakMethod makes a new one per call.
    if isinstance(target, types.MethodType) and isinstance(current, types.MethodType):
        return (
            current.__self__ is target.__self__ and current.__func__ is target.__func__
        )
    return current is target


def _reset_in_child() -> None:
    """Run every registered reset; called by os.register_at_fork in the child."""
    global _registry_lock
    # The parent's lock may have been held by another thread at fork time;
    # in the child that thread does not exist and would never release it.
    _registry_lock = threading.Lock()
    first_error: BaseException | None = None
    for ref, call_method in list(_registry):
        target = ref()
        if target is None:
            continue
        try:
            if call_method:
                target.forksafe_reset()
            else:
                target()
        except Exception as exc:
            # One broken reset must not stop the others; the first error is
            # re-raised below and printed by CPython as an unraisable error.
            if first_error is None:
                first_error = exc
    if first_error is not None:
        raise first_error


def _size_of(value: Any) -> int:
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int) and not isinstance(nbytes, bool):
        return nbytes
    return sys.getsizeof(value)


def _check_bound(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"LRUCache({name}={value!r}) is invalid; allowed: an int >= 1 or None."
        raise ConfigError(msg)


_MISSING: Final = object()


@final
class LRUCache:
    """Thread-safe least-recently-used cache, emptied in forked children.

    Parameters
    ----------
    max_items : int or None
        Most entries kept; ``None`` for no limit on the count.
    max_bytes : int or None
        Most bytes kept, summed over the entries' sizes; ``None`` for no
        limit. A value larger than ``max_bytes`` on its own is not cached.

    Notes
    -----
    An entry's size is the ``nbytes`` given to ``put``, else the value's
    ``nbytes`` attribute (numpy arrays), else ``sys.getsizeof(value)``.
    Every method may be called from any thread. The cache registers itself
    with ``register_fork_reset`` on creation, so a forked child starts with
    an empty cache and a fresh lock.
    """

    def __init__(
        self, *, max_items: int | None = None, max_bytes: int | None = None
    ) -> None:
        _check_bound("max_items", max_items)
        _check_bound("max_bytes", max_bytes)
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._data: collections.OrderedDict[Hashable, tuple[Any, int]] = (
            collections.OrderedDict()
        )
        self._nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        register_fork_reset(self)

    @property
    def max_items(self) -> int | None:
        """The item bound given at creation."""
        return self._max_items

    @property
    def max_bytes(self) -> int | None:
        """The byte bound given at creation."""
        return self._max_bytes

    @property
    def nbytes(self) -> int:
        """Bytes currently held, as counted by ``put``."""
        return self._nbytes

    def get(self, key: Hashable, default: Any = None) -> Any:
        """Return the value cached under ``key`` (most recent now), or ``default``.

        Parameters
        ----------
        key : hashable
            The cache key.
        default : object
            Returned when ``key`` is absent.
        """
        with self._lock:
            item = self._data.get(key, _MISSING)
            if item is _MISSING:
                self.misses += 1
                return default
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any, *, nbytes: int | None = None) -> bool:
        """Cache ``value`` under ``key``, evicting the least recently used.

        Parameters
        ----------
        key : hashable
            The cache key; an existing entry is replaced.
        value : object
            The value to keep.
        nbytes : int or None
            Size to count for ``value``; estimated when ``None``.

        Returns
        -------
        bool
            False when ``value`` alone exceeds ``max_bytes`` and was not kept.
        """
        size = _size_of(value) if nbytes is None else int(nbytes)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._nbytes -= old[1]
            if self._max_bytes is not None and size > self._max_bytes:
                return False
            self._data[key] = (value, size)
            self._nbytes += size
            self._evict()
            return True

    def _evict(self) -> None:
        # Called with self._lock held.
        while self._data and (
            (self._max_items is not None and len(self._data) > self._max_items)
            or (self._max_bytes is not None and self._nbytes > self._max_bytes)
        ):
            _, (_, size) = self._data.popitem(last=False)
            self._nbytes -= size
            self.evictions += 1

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def clear(self) -> None:
        """Drop every entry (the counters are kept)."""
        with self._lock:
            self._data.clear()
            self._nbytes = 0

    def forksafe_reset(self) -> None:
        """Empty the cache and replace its lock; called in a forked child.

        Notes
        -----
        The old lock is not acquired: a parent thread may have held it at
        fork time, and that thread does not exist in the child.
        """
        self._lock = threading.Lock()
        self._data = collections.OrderedDict()
        self._nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __repr__(self) -> str:
        return (
            f"LRUCache(items={len(self._data)}/{self._max_items}, "
            f"bytes={self._nbytes}/{self._max_bytes})"
        )
