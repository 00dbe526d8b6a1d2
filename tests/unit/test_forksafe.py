"""engine.forksafe: the LRU cache and the fork-reset registry, in one process.

Real forks are in tests/integration/test_payload_processes.py; here the
child-side hook ``_reset_in_child`` is called directly on an isolated registry,
so no reset touches the objects of other tests in this process.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from engine import forksafe
from engine.errors import ConfigError
from engine.forksafe import LRUCache, register_fork_reset, unregister_fork_reset


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """An empty, private fork-reset registry for one test."""
    fresh: list[object] = []
    monkeypatch.setattr(forksafe, "_registry", fresh)
    monkeypatch.setattr(forksafe, "_registry_lock", threading.Lock())
    return fresh


class Resettable:
    def __init__(self) -> None:
        self.resets = 0

    def forksafe_reset(self) -> None:
        self.resets += 1


class SlottedCallable:
    __slots__ = ()

    def __call__(self) -> None:
        pass


class Failing:
    def forksafe_reset(self) -> None:
        raise RuntimeError("reset failed")


# -- LRUCache -----------------------------------------------------------------


def test_lru_evicts_least_recently_used_item() -> None:
    cache = LRUCache(max_items=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3)
    assert "b" not in cache
    assert ("a" in cache, "c" in cache, len(cache)) == (True, True, 2)
    assert cache.evictions == 1


def test_lru_bounds_bytes_using_nbytes() -> None:
    cache = LRUCache(max_bytes=100)
    cache.put("a", np.zeros(5))  # 40 bytes
    cache.put("b", np.zeros(5))
    cache.put("c", np.zeros(5))  # 120 > 100: "a" goes
    assert "a" not in cache
    assert cache.nbytes == 80
    assert cache.put("d", "x", nbytes=30) is True
    assert "b" not in cache
    assert cache.nbytes == 70


def test_lru_does_not_keep_a_value_larger_than_max_bytes() -> None:
    cache = LRUCache(max_bytes=10)
    cache.put("small", b"", nbytes=5)
    assert cache.put("big", np.zeros(100)) is False
    assert "big" not in cache
    assert "small" in cache


def test_lru_replacing_a_key_recounts_bytes() -> None:
    cache = LRUCache(max_bytes=1000)
    cache.put("k", np.zeros(10))
    cache.put("k", np.zeros(20))
    assert (len(cache), cache.nbytes) == (1, 160)


def test_lru_get_default_clear_and_counters() -> None:
    cache = LRUCache()
    assert cache.get("missing", "default") == "default"
    cache.put("k", None)
    assert cache.get("k", "default") is None  # a cached None is a hit
    assert (cache.hits, cache.misses) == (1, 1)
    cache.clear()
    assert (len(cache), cache.nbytes) == (0, 0)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
@pytest.mark.parametrize("field", ["max_items", "max_bytes"])
def test_lru_rejects_bad_bounds(field: str, bad: object) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        LRUCache(**{field: bad})  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_lru_is_consistent_under_threads() -> None:
    cache = LRUCache(max_items=50, max_bytes=4000)
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        try:
            for i in range(3000):
                key = (seed * 7 + i) % 97
                if i % 3:
                    cache.put(key, i, nbytes=key + 1)
                else:
                    cache.get(key)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) <= 50
    assert cache.nbytes <= 4000


def test_forksafe_reset_empties_and_replaces_a_held_lock() -> None:
    cache = LRUCache(max_items=3)
    cache.put("k", 1)
    # A parent thread held the lock at fork time: the child must not wait.
    cache._lock.acquire()
    cache.forksafe_reset()
    assert len(cache) == 0
    cache.put("k", 2)
    assert cache.get("k") == 2


# -- register_fork_reset ------------------------------------------------------


def test_reset_runs_objects_functions_and_bound_methods(registry: list[object]) -> None:
    calls: list[str] = []
    resettable = Resettable()

    def reset_function() -> None:
        calls.append("function")

    class Holder:
        def reset(self) -> None:
            calls.append("method")

    holder = Holder()
    assert register_fork_reset(resettable) is resettable
    assert register_fork_reset(reset_function) is reset_function
    register_fork_reset(holder.reset)
    forksafe._reset_in_child()
    assert resettable.resets == 1
    assert calls == ["function", "method"]


def test_registration_is_weak(registry: list[object]) -> None:
    resettable = Resettable()
    register_fork_reset(resettable)
    del resettable
    gc.collect()
    forksafe._reset_in_child()  # the collected target is skipped
    register_fork_reset(Resettable.forksafe_reset)  # prunes dead entries
    assert len(registry) == 1


def test_lru_cache_registers_itself(registry: list[object]) -> None:
    cache = LRUCache(max_items=2)
    cache.put("k", 1)
    forksafe._reset_in_child()
    assert len(cache) == 0


def test_one_failing_reset_does_not_stop_the_others(registry: list[object]) -> None:
    first, last = Resettable(), Resettable()
    failing = Failing()
    for target in (first, failing, last):
        register_fork_reset(target)
    with pytest.raises(RuntimeError, match="reset failed"):
        forksafe._reset_in_child()
    assert (first.resets, last.resets) == (1, 1)


def test_unregister(registry: list[object]) -> None:
    resettable = Resettable()
    calls: list[str] = []

    class Holder:
        def reset(self) -> None:
            calls.append("method")

    holder = Holder()
    register_fork_reset(resettable)
    register_fork_reset(holder.reset)
    unregister_fork_reset(resettable)
    unregister_fork_reset(holder.reset)  # a new bound method object, same target
    forksafe._reset_in_child()
    assert (resettable.resets, calls) == (0, [])


def test_rejects_what_it_cannot_reset(registry: list[object]) -> None:
    with pytest.raises(TypeError, match="neither callable"):
        register_fork_reset(42)
    with pytest.raises(TypeError, match="weak"):
        register_fork_reset(SlottedCallable())  # no __weakref__ slot
