"""One map's record, shared by its map thread and the dispatcher.

``Run`` holds a map's encoded chunks waiting for a worker (the outbox), the
outcomes that came back, and its state (``RunState``: an Enum and a
transition table, changed under the run's condition). The map thread
enqueues, takes outcomes in order and stops the run; the dispatcher's step
pops chunks, delivers outcomes and finishes the run. How many chunks a
worker may hold for it (its depth) follows the chunk times measured.
"""

from __future__ import annotations

import collections
import enum
import threading
from typing import Any, Final, NamedTuple

from engine._wire import CANCELLED, ERROR, RESULT
from engine.errors import BrokenExecutorError
from engine.telemetry import RunRecorder

# Chunks a worker holds at once (its "depth"): at least one running and one
# waiting in its socket, so it never idles between chunks. Tiny chunks need
# more: the next one must arrive before the worker runs out, and on a busy
# machine the dispatcher may wait a millisecond to be scheduled (W4: with 2
# in flight, chunk-size-1 maps ran at 200 us/task). A worker holds about
# DEPTH_BUDGET_S of queued work, at most MAX_DEPTH chunks: little to redo
# after a crash or forced cancel, little imbalance at the end of a map.
MIN_DEPTH: Final = 2
MAX_DEPTH: Final = 128
DEPTH_BUDGET_S: Final = 0.002
# A tiny chunk's cost to a worker inside a pack (run_chunk, one pickle):
# the floor of the per-chunk time used to size the depth (measured ~8 us).
CHUNK_OVERHEAD_S: Final = 10e-6
# Packs: when a worker may hold many chunks (tiny ones), consecutive chunks
# of plain items travel as one frame each way, a quarter of its depth at a
# time, so it holds four packs: enough to keep working while the map thread
# decodes a batch (W4, ci/bench/dispatch.py: per-chunk frames cost 60 us a
# task; packs of 32 in flight x4 brought chunk size 1 to ~0.35x PPE). The
# progress board keeps a crash pinned on the chunk that ran.
PACK_PER_DEPTH: Final = 4
MAX_PACK: Final = 32


# -- one run, shared by its map thread and the dispatcher ----------------------------------


class RunState(enum.Enum):
    """Where one map is: dispatching, winding down, or finished."""

    ACTIVE = "active"
    STOPPING = "stopping"
    DONE = "done"


_RUN_TRANSITIONS: Final = {
    RunState.ACTIVE: frozenset({RunState.STOPPING}),
    RunState.STOPPING: frozenset({RunState.DONE}),
    RunState.DONE: frozenset(),
}


class Outgoing(NamedTuple):
    """An encoded chunk (or a pack of ``count`` chunks) waiting for a worker."""

    index: int
    start: int
    payload: bytes
    enqueued_at: float
    count: int = 1


class OutcomeKind(enum.Enum):
    """How a chunk ended."""

    RESULT = "result"
    ERROR = "error"  # fn raised, or (un)pickling failed in the worker
    CANCELLED = "cancelled"
    CRASHED = "crashed"  # the worker died while running it
    LOST = "lost"  # in a pack whose worker died: the map thread sends it again
    FAILED = "failed"  # the whole pool failed (supervisor lost, shut down)


class Outcome(NamedTuple):
    """What the map thread receives for one chunk."""

    kind: OutcomeKind
    payload: Any = None
    pid: int | None = None
    exitcode: int | None = None
    signal_name: str | None = None
    dispatch_wait_s: float = 0.0
    error_type: type[BrokenExecutorError] | None = None
    reason: str = ""
    # A pack's results arrive as one outcome at its first index, covering
    # ``count`` consecutive chunks (engine._wire.split_pack splits it).
    count: int = 1


KINDS_BY_FRAME: Final = {
    RESULT: OutcomeKind.RESULT,
    ERROR: OutcomeKind.ERROR,
    CANCELLED: OutcomeKind.CANCELLED,
}


class Run:
    """One map's chunks, outcomes and state; its condition guards them.

    The map thread calls ``enqueue``, ``take``/``take_ready``, ``observe``
    and ``stop``; the step calls ``pop_outgoing``, ``requeue``, ``deliver``,
    ``fail`` and ``finish``. ``in_flight`` and ``kill_deadline`` belong to
    the step alone.
    """

    def __init__(
        self, run_id: int, fn_blob: bytes, recorder: RunRecorder, grace_s: float
    ) -> None:
        self.run_id = run_id
        self.fn_blob = fn_blob
        self.recorder = recorder
        self.grace_s = grace_s
        self._cond = threading.Condition(threading.Lock())
        self._state = RunState.ACTIVE
        self._outbox: collections.deque[Outgoing] = collections.deque()
        self._outcomes: dict[int, Outcome] = {}
        self._failures: collections.deque[int] = collections.deque()
        self._waiting_for = -1
        self._failure: Outcome | None = None
        # Set by the map thread from measured chunk times, read by the step
        # (an int: a racy read is harmless).
        self.depth = MIN_DEPTH
        self.pack = 1  # chunks per frame, set with the depth
        self.in_flight = 0
        self.kill_deadline: float | None = None

    @property
    def state(self) -> RunState:
        return self._state

    def _move(self, target: RunState) -> bool:
        # Called with self._cond held.
        if target not in _RUN_TRANSITIONS[self._state]:
            return False
        self._state = target
        return True

    # -- map thread ---------------------------------------------------------------

    def enqueue(self, items: list[Outgoing]) -> None:
        with self._cond:
            if self._state is RunState.ACTIVE:
                self._outbox.extend(items)

    def _collect(self, index: int) -> list[tuple[int, Outcome]]:
        # Called with self._cond held: the outcomes of index, index + 1, ...
        # while consecutive; else one failure of a later chunk; else the
        # pool's failure (index -1).
        outcomes = self._outcomes
        ready = []
        while index in outcomes:
            outcome = outcomes.pop(index)
            ready.append((index, outcome))
            index += outcome.count
        if ready:
            if self._failures:  # failures among them are handled in order
                taken = {i for i, _ in ready}
                self._failures = collections.deque(
                    i for i in self._failures if i not in taken
                )
            return ready
        if self._failures:
            failed = self._failures.popleft()
            return [(failed, outcomes.pop(failed))]
        if self._failure is not None:
            return [(-1, self._failure)]
        return ready

    def take_ready(self, index: int) -> list[tuple[int, Outcome]]:
        """Return what ``take`` would, without waiting."""
        with self._cond:
            return self._collect(index)

    def take(self, index: int, timeout_s: float) -> list[tuple[int, Outcome]]:
        """Wait up to ``timeout_s`` for chunk ``index``, then ``take_ready``."""
        with self._cond:
            if (
                index not in self._outcomes
                and not self._failures
                and self._failure is None
            ):
                self._waiting_for = index
                self._cond.wait(timeout_s)
                self._waiting_for = -1
            return self._collect(index)

    def observe(self, chunks: int, compute_s: float) -> None:
        """Resize the depth from the run's finished chunks and their worker time."""
        if chunks > 0:
            mean = max(compute_s / chunks, CHUNK_OVERHEAD_S)
            self.depth = max(MIN_DEPTH, min(MAX_DEPTH, int(DEPTH_BUDGET_S / mean)))
            self.pack = max(1, min(MAX_PACK, self.depth // PACK_PER_DEPTH))

    def stop(self, reason: str) -> bool:
        """Stop dispatching; return False if it was stopped already."""
        with self._cond:
            if not self._move(RunState.STOPPING):
                return False
            self._outbox.clear()
            self._outcomes.clear()
            return True

    # -- the step -----------------------------------------------------------------------

    def head_count(self) -> int:
        """Chunks in the next outgoing item, 0 if none (a racy peek)."""
        outbox = self._outbox
        try:
            return outbox[0].count if outbox else 0
        except IndexError:  # emptied meanwhile
            return 0

    def pop_outgoing(
        self, room: int, *, may_exceed: bool = False, cap: int | None = None
    ) -> list[Outgoing]:
        """Pop what fits in ``room`` chunks (packs count their chunks).

        With ``may_exceed``, an idle worker takes the first pack even if it
        is larger than its room, but never more than ``cap`` chunks (what
        is left of its worker_max_tasks).
        """
        with self._cond:
            outbox = self._outbox
            taken: list[Outgoing] = []
            if self._state is not RunState.ACTIVE:
                return taken
            if cap is not None:
                room = min(room, cap)
            while outbox and (
                outbox[0].count <= room
                or (
                    may_exceed and not taken and (cap is None or outbox[0].count <= cap)
                )
            ):
                item = outbox.popleft()
                taken.append(item)
                room -= item.count
            return taken

    def requeue(self, item: Outgoing) -> None:
        """Put back a chunk that a lost worker had not started."""
        with self._cond:
            if self._state is RunState.ACTIVE:
                self._outbox.appendleft(item)

    def deliver(self, index: int, outcome: Outcome) -> None:
        self.deliver_many([(index, outcome)])

    def deliver_many(self, outcomes: list[tuple[int, Outcome]]) -> None:
        with self._cond:
            if self._state is not RunState.ACTIVE:
                return
            wake = False
            for index, outcome in outcomes:
                self._outcomes[index] = outcome
                if outcome.kind is not OutcomeKind.RESULT:
                    self._failures.append(index)
                    wake = True
                elif index == self._waiting_for:
                    wake = True
            if wake:
                self._cond.notify_all()

    def fail(self, outcome: Outcome) -> None:
        """Fail the whole run (the pool broke or shut down)."""
        with self._cond:
            if self._failure is None:
                self._failure = outcome
            self._cond.notify_all()

    def finish(self) -> bool:
        with self._cond:
            return self._move(RunState.DONE)


class MapCounts:
    """One map's telemetry, summed in the map thread and flushed in batches.

    RunRecorder.add takes a lock; per tiny chunk that was measurable (W4).
    """

    __slots__ = (
        "bytes_pickled",
        "chunks",
        "compute_s",
        "dispatch_overhead_s",
        "items",
        "queue_wait_s",
        "total_chunks",
        "total_compute_s",
    )

    def __init__(self) -> None:
        self.total_chunks = 0  # over the whole run: they size the depth
        self.total_compute_s = 0.0
        self._reset()

    def _reset(self) -> None:
        self.chunks = self.items = self.bytes_pickled = 0
        self.compute_s = self.queue_wait_s = self.dispatch_overhead_s = 0.0

    def flush(self, recorder: RunRecorder) -> None:
        recorder.add(
            chunks=self.chunks,
            items=self.items,
            compute_s=self.compute_s,
            queue_wait_s=self.queue_wait_s,
            bytes_pickled=self.bytes_pickled,
            dispatch_overhead_s=self.dispatch_overhead_s,
        )
        self.total_chunks += self.chunks
        self.total_compute_s += self.compute_s
        self._reset()
