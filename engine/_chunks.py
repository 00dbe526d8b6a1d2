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

# Chunk size for a stream of unknown length, when none is configured or
# planned: calibrated-explanations' default instance chunk.
DEFAULT_STREAM_CHUNK_SIZE: Final = 8


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


def call_into(
    results: list[Any],
    fn: Callable[..., Any],
    items: Iterable[Any],
    extra_args: tuple[Any, ...],
) -> None:
    """Append ``fn(item, *extra_args)`` for each item, with no per-item checks.

    auto's loops in the caller (its probe, its tiny maps). ``map()`` when
    there are no extra arguments: W4's 10,000 trivial items ran 11 % slower
    than the serial strategy through a generator.
    """
    if extra_args:
        results.extend([fn(item, *extra_args) for item in items])
    else:
        results.extend(map(fn, items))


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


# Adaptive chunks never grow by more than this factor from one chunk to the
# next, so one misleadingly fast early chunk cannot produce a giant one.
MAX_GROWTH: Final = 4
# The tail cap keeps at least this many chunks per worker in what remains,
# so chunks shrink towards the end and workers finish together.
TAIL_CHUNKS_PER_WORKER: Final = 2
# ... but never below 1/8 of the target duration's worth of items.
TAIL_FLOOR_DIVISOR: Final = 8


class AdaptiveChunks:
    """Chunks sized from measured cost: aim at a duration, shrink at the end.

    ``measured()`` returns ``(items_done, compute_s)`` so far (the run's
    telemetry counters); each chunk is sized when the strategy asks for it,
    so sizes follow the work as it is measured. Chunking never changes
    results, only how items are grouped.
    """

    def __init__(
        self,
        items: Sequence[Any],
        *,
        workers: int,
        initial_size: int,
        target_chunk_s: float,
        measured: Callable[[], tuple[int, float]],
    ) -> None:
        self._items = items
        self._workers = max(1, workers)
        self._size = max(1, initial_size)
        self._target_s = target_chunk_s
        self._measured = measured
        self.sizes: list[int] = []

    def _next_size(self, remaining: int) -> int:
        done, compute_s = self._measured()
        size = self._size
        floor = 1
        if done > 0 and compute_s > 0:
            wanted = max(1, int(self._target_s * done / compute_s))
            size = min(wanted, size * MAX_GROWTH)
            # Items so cheap that a chunk of them takes a fraction of the
            # target finish together anyway: do not split them further.
            floor = max(1, wanted // TAIL_FLOOR_DIVISOR)
        tail_cap = math.ceil(remaining / (TAIL_CHUNKS_PER_WORKER * self._workers))
        self._size = max(1, min(size, max(tail_cap, floor)))
        return self._size

    def __iter__(self) -> Iterator[Chunk]:
        total = len(self._items)
        start = 0
        index = 0
        while start < total:
            size = self._next_size(total - start)
            self.sizes.append(size)
            yield Chunk(index, start, self._items[start : start + size])
            start += size
            index += 1


def plan_chunks(
    items: Iterable[Any],
    *,
    explicit: int | None,
    n_items: int | None,
    serial: bool,
    workers: int,
    planned_size: int | None,
    target_chunk_s: float,
    measured: Callable[[], tuple[int, float]],
) -> Iterable[Chunk]:
    """The chunks of one run: an explicit size wins; otherwise adaptive chunks
    over a sequence, one chunk on the serial strategy, and ``planned_size``
    (else ``DEFAULT_STREAM_CHUNK_SIZE``) over a stream.

    ``measured`` is :class:`AdaptiveChunks`'s ``(items_done, compute_s)``.
    """
    if explicit:
        return make_chunks(items, explicit)
    if n_items is None or not isinstance(items, Sequence):
        return make_chunks(items, planned_size or DEFAULT_STREAM_CHUNK_SIZE)
    if serial:
        return make_chunks(items, max(1, n_items))
    return AdaptiveChunks(
        items,
        workers=workers,
        initial_size=planned_size or default_chunk_size(n_items, workers),
        target_chunk_s=target_chunk_s,
        measured=measured,
    )
