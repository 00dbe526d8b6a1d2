"""Chunking of work items, running one chunk, and ordered reassembly."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from engine._state import worker_scope
from engine.errors import CancelledError

# Chunks per worker when no chunk size is given: enough for load balance when
# items differ in cost, few enough that per-chunk overhead stays small
# (ci/bench/dispatch.py, W4).
DEFAULT_CHUNKS_PER_WORKER: Final = 4


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of consecutive work items: ``items`` start at input ``start``."""

    index: int
    start: int
    items: Sequence[Any]

    def __len__(self) -> int:
        return len(self.items)


def default_chunk_size(n_items: int, workers: int) -> int:
    """Return the chunk size giving about 4 chunks per worker."""
    if n_items <= 0:
        return 1
    return max(1, math.ceil(n_items / (max(1, workers) * DEFAULT_CHUNKS_PER_WORKER)))


def make_chunks(items: Iterable[Any], chunk_size: int) -> Iterator[Chunk]:
    """Yield consecutive chunks of ``chunk_size`` items (lazily for iterators)."""
    if chunk_size < 1:
        msg = f"chunk_size={chunk_size!r} must be >= 1"
        raise ValueError(msg)
    if isinstance(items, Sequence):
        for index, start in enumerate(range(0, len(items), chunk_size)):
            yield Chunk(index, start, items[start : start + chunk_size])
        return
    iterator = iter(items)
    start = 0
    for index in itertools.count():
        block = list(itertools.islice(iterator, chunk_size))
        if not block:
            return
        yield Chunk(index, start, block)
        start += len(block)


def run_chunk(
    fn: Callable[..., Any],
    items: Sequence[Any],
    extra_args: tuple[Any, ...],
    *,
    is_cancelled: Callable[[], bool] | None = None,
    as_worker: bool = True,
) -> tuple[list[Any], float]:
    """Run ``fn(item, *extra_args)`` for each item; return results and seconds.

    ``is_cancelled`` is checked between items (cooperative cancellation);
    ``as_worker`` marks the thread so a nested executor runs serially.
    """
    results: list[Any] = []
    started = time.perf_counter()
    scope = worker_scope() if as_worker else contextlib.nullcontext()
    with scope:
        for item in items:
            if is_cancelled is not None and is_cancelled():
                msg = "the run was cancelled while this chunk was running"
                raise CancelledError(msg)
            results.append(fn(item, *extra_args))
    return results, time.perf_counter() - started


class OrderedBuffer:
    """Reassemble results that arrive out of order, releasing them in order."""

    def __init__(self) -> None:
        self._pending: dict[int, Any] = {}
        self._next = 0

    def put(self, index: int, value: Any) -> None:
        if index < self._next or index in self._pending:
            msg = f"chunk {index} delivered twice"
            raise RuntimeError(msg)
        self._pending[index] = value

    def pop_ready(self) -> Iterator[Any]:
        """Yield every value whose predecessors have all been released."""
        while self._next in self._pending:
            value = self._pending.pop(self._next)
            self._next += 1
            yield value

    @property
    def next_index(self) -> int:
        return self._next

    def __len__(self) -> int:
        return len(self._pending)
