"""The processes strategy: chunks on worker processes owned by a supervisor.

::

    map thread (run)                          dispatcher thread        workers
      payloads.dumps((fn, extra_args)) once ─▶ Run.fn_blob ── FUNC ──▶ (once per
      encode chunks: plain -> pickle,           outbox ─── TASK ────▶  worker)
        else payloads.dumps (big arrays           (<= 2 per worker)
        -> shared memory, names -> supervisor)
      Run.wait_for(k) ◀── outcomes ◀──────────── RESULT / ERROR / CANCELLED
      decode in order, yield (chunk, results)    crash -> CRASHED outcome
      crash: WorkerCrashedError, or re-run serially here
      (force_serial_on_failure) with a FallbackWarning (_failures.settle)
      error / cancel / timeout / close: Run.stop -> CANCEL, kill after grace

The pool (a supervisor process and its workers, engine._supervisor_main)
starts once, in ``start()``, and lives as long as the executor: a warm
``map`` pays no start-up (DESIGN.md section 4). The map thread does all
pickling and unpickling of user objects, so a strange result can never stall
the dispatcher that serves every other map.
"""

from __future__ import annotations

import atexit
import enum
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final, final

from engine import payload as _payload
from engine._chunks import Chunk
from engine._context import (
    process_support_problem,
    resolve_start_method,
    thread_cap,
    worker_environment,
)
from engine._wire import is_plain
from engine.errors import BrokenExecutorError, PayloadError, StrategyUnavailableError
from engine.forksafe import register_fork_reset, unregister_fork_reset
from engine.strategies._dispatch import Dispatcher
from engine.strategies._encoding import decode_ready, dump_items, unpicklable_error
from engine.strategies._failures import settle
from engine.strategies._runs import MapCounts, OutcomeKind, Outgoing, Run
from engine.strategies.base import POLL_INTERVAL_S, RunContext, Strategy

if TYPE_CHECKING:
    from engine.config import ParallelConfig
    from engine.payload import PayloadStore

__all__ = ["ProcessesStrategy"]

_RESULT: Final = OutcomeKind.RESULT
_LOST: Final = OutcomeKind.LOST

# Chunks one map keeps outstanding (encoded and queued, at a worker, or
# finished but not yet consumed): per worker, twice its depth (what it may
# hold, engine.strategies._dispatch) plus two. This bounds memory for imap
# over a huge stream while keeping every worker fed.
OUTSTANDING_SLACK: Final = 2
# Spawn with numpy and numba takes 0.6-0.9 s per worker here (BENCH.md);
# a loaded CI machine can be ten times slower.
START_TIMEOUT_S: Final = 60.0

_REMEDY_OFF: Final = (
    "set CE_PARALLEL=off (or ParallelConfig(strategy='serial'/'threads')) to run "
    "without worker processes"
)


class _Phase(enum.Enum):
    """The strategy's own life, around its pool's."""

    NEW = "new"
    STARTED = "started"
    CLOSED = "closed"


_PHASES: Final = {
    _Phase.NEW: frozenset({_Phase.STARTED, _Phase.CLOSED}),
    _Phase.STARTED: frozenset({_Phase.CLOSED}),
    _Phase.CLOSED: frozenset(),
}

# Pools still open at interpreter exit are closed by one atexit hook
# (FAULTS.md #18); SUPERVISOR-NOTES.md pitfall 5.
_live: weakref.WeakSet[ProcessesStrategy] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_installed = False


def _close_live_pools() -> None:
    for strategy in list(_live):
        strategy.shutdown()


def _install_atexit() -> None:
    global _atexit_installed
    with _atexit_lock:
        if not _atexit_installed:
            _atexit_installed = True
            atexit.register(_close_live_pools)


@final
class ProcessesStrategy(Strategy):
    """Run chunks on supervised worker processes.

    Parameters
    ----------
    config : ParallelConfig
        ``start_method``, ``cancel_grace_s``, ``worker_max_tasks`` and
        ``force_serial_on_failure`` are used here.
    workers : int
        Number of worker processes.
    payloads : PayloadStore or None
        The executor's store: functions, arguments and non-plain chunks are
        pickled with it, so large arrays travel through shared memory.

    Raises
    ------
    ConfigError
        ``start_method`` is not available on this platform.
    """

    NAME: ClassVar[str] = "processes"
    IN_PROCESS: ClassVar[bool] = False
    STARTS_EAGERLY: ClassVar[bool] = True

    def __init__(
        self,
        config: ParallelConfig,
        *,
        workers: int,
        payloads: PayloadStore | None = None,
    ) -> None:
        super().__init__(config, workers=workers, payloads=payloads)
        self._start_method = resolve_start_method(config.start_method)
        self._thread_cap = thread_cap(self.workers)
        self._lock = threading.Lock()
        self._phase = _Phase.NEW
        self._dispatcher: Dispatcher | None = None
        self._owner_pid = os.getpid()
        self._own_payloads = payloads is None
        self._names_lock = threading.Lock()
        self._registered: set[str] = set()

    # -- properties ---------------------------------------------------------------

    @property
    def start_method(self) -> str:
        """How workers start: ``"fork"``, ``"spawn"`` or ``"forkserver"``."""
        return self._start_method

    @property
    def thread_cap(self) -> int:
        """BLAS/OpenMP/numba threads per worker: ``max(1, cpus // workers)``."""
        return self._thread_cap

    # -- lifecycle -------------------------------------------------------------------

    def _move(self, target: _Phase) -> None:
        # Called with self._lock held.
        if target not in _PHASES[self._phase]:
            msg = f"the processes strategy cannot move from {self._phase.value} to {target.value}"
            raise BrokenExecutorError(msg)
        self._phase = target

    def start(self) -> None:
        """Start the supervisor and its workers; idempotent.

        Raises
        ------
        StrategyUnavailableError
            Worker processes cannot run here or failed to start; the message
            names the cause and the remedy (``CE_PARALLEL=off``).
        """
        with self._lock:
            if self._phase is _Phase.STARTED:
                return
            if self._phase is _Phase.CLOSED:
                msg = "this processes strategy was shut down; create a new executor"
                raise BrokenExecutorError(msg)
            self._check_can_start()
            if self.payloads is None:
                self.payloads = _payload.PayloadStore(
                    threshold_bytes=self.config.shm_threshold_bytes
                )
            # SHM-NOTES.md P2: the tracker runs before the supervisor starts,
            # so the supervisor and every worker share it.
            _payload.ensure_tracker()
            dispatcher = Dispatcher(
                workers=self.workers,
                start_method=self._start_method,
                environment=worker_environment(self.workers),
                worker_max_tasks=self.config.worker_max_tasks,
            )
            try:
                dispatcher.start(START_TIMEOUT_S)
            except StrategyUnavailableError as exc:
                other = "spawn" if self._start_method != "spawn" else "forkserver"
                msg = (
                    f"the processes strategy cannot start worker processes "
                    f"(start_method={self._start_method!r}): {exc}. Remedies: if a "
                    "traceback above points at your main module, guard it with `if "
                    '__name__ == "__main__":`; try another start method '
                    f"(CE_PARALLEL=processes,start={other}); or {_REMEDY_OFF}."
                )
                raise StrategyUnavailableError(msg) from exc
            self._dispatcher = dispatcher
            self._move(_Phase.STARTED)
        _live.add(self)
        register_fork_reset(self)
        _install_atexit()

    # FAULTS.md #21 and the issue's "environment that cannot run worker
    # processes": refuse before launching anything, with the cause and the
    # remedy; the executor turns this into a serial fallback under auto or
    # force_serial_on_failure.
    def _check_can_start(self) -> None:
        import multiprocessing.process

        if getattr(multiprocessing.process.current_process(), "_inheriting", False):
            # FAULTS.md #21: the multiprocessing spawn/forkserver bootstrap of
            # a child is importing the main module, which creates an executor
            # at import time; the same check as multiprocessing's own
            # _check_not_importing_main.
            msg = (
                "a process pool was requested while this process is still being "
                "started by multiprocessing (spawn or forkserver): the main module "
                "creates an executor when it is imported. Put that code under "
                '`if __name__ == "__main__":`, or ' + _REMEDY_OFF + "."
            )
            raise StrategyUnavailableError(msg)
        problem = process_support_problem()
        if problem is not None:
            msg = f"worker processes cannot run here: {problem}; {_REMEDY_OFF}."
            raise StrategyUnavailableError(msg)

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop the workers and the supervisor; idempotent, bounded in time.

        ``wait`` is accepted for the interface: busy workers are killed at
        once either way (their results could no longer be used), idle ones
        exit on their own, and the call returns within a few seconds.
        """
        with self._lock:
            if self._phase is _Phase.CLOSED:
                return
            self._move(_Phase.CLOSED)
            dispatcher, self._dispatcher = self._dispatcher, None
        _live.discard(self)
        unregister_fork_reset(self)
        if os.getpid() != self._owner_pid:
            return  # a forked child: the pool is the parent's
        if dispatcher is not None:
            dispatcher.shutdown()
        if self._own_payloads and self.payloads is not None:
            self.payloads.close()

    def forksafe_reset(self) -> None:
        """In a forked child of the caller: let go of the parent's pool."""
        # Runs in the child right after fork (engine.forksafe), before any
        # other code: the dispatcher thread does not exist there, and the
        # parent's sockets must not stay open in the child (pitfall 6).
        self._lock = threading.Lock()  # a parent thread may have held the old one
        self._names_lock = threading.Lock()
        dispatcher, self._dispatcher = self._dispatcher, None
        self._phase = _Phase.CLOSED
        if dispatcher is not None:
            dispatcher.forget_in_child()

    def cancel(self) -> None:
        """Cancel every map of this pool; stuck workers die after the grace."""
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.cancel_all("Strategy.cancel() was called")

    def _usable_dispatcher(self) -> Dispatcher:
        if os.getpid() != self._owner_pid:
            msg = (
                f"this executor's process pool belongs to process {self._owner_pid}; "
                "a forked child cannot use it. Create a new executor in the child."
            )
            raise BrokenExecutorError(msg)
        self.start()
        dispatcher = self._dispatcher
        if dispatcher is None:
            msg = "the processes strategy was shut down; create a new executor"
            raise BrokenExecutorError(msg)
        failure = dispatcher.failure()
        if failure is not None:
            error_type, reason = failure
            raise error_type(reason)
        return dispatcher

    # -- pickling --------------------------------------------------------------------

    def _store(self) -> PayloadStore:
        store = self.payloads
        assert store is not None, "start() creates the store"
        return store

    def _dump_function(
        self, fn: Callable[..., Any], extra_args: tuple[Any, ...], used: set[str]
    ) -> bytes:
        """Pickle ``(fn, extra_args)`` once per map, before anything is sent."""
        store = self._store()
        try:
            return store.dumps((fn, tuple(extra_args)), used=used)
        except PayloadError:
            raise
        except Exception as exc:
            raise unpicklable_error(store, fn, extra_args, exc) from exc

    def _encode(self, chunk: Chunk, used: set[str]) -> bytes:
        # Plain items (numbers, strings, tuples of them) take the C pickler
        # directly; anything else goes through the store, which moves large
        # arrays to shared memory (for this run: ``used``) and replaces
        # shared objects by handles.
        items = chunk.items
        if is_plain(items):
            return pickle.dumps(items, protocol=5)
        data = dump_items(self._store(), chunk, used)
        self._register_segments()
        return data

    def _register_segments(self) -> None:
        """Tell the supervisor every new segment: its crash net (FAULTS.md #7)."""
        # Called at the start of every map and after every non-plain chunk,
        # the only places new segments appear; the supervisor unlinks them
        # by name if this process dies (the tracker would only after every
        # worker exits, SHM-NOTES.md P6).
        dispatcher = self._dispatcher
        if dispatcher is None or self.payloads is None:
            return
        names = self.payloads.segment_names()
        with self._names_lock:
            new = [name for name in names if name not in self._registered]
            self._registered.update(new)
        if new:
            dispatcher.register_segments(new)

    # -- running -----------------------------------------------------------------------

    def run(
        self,
        fn: Callable[..., Any],
        chunks: Iterable[Chunk],
        extra_args: tuple[Any, ...],
        ctx: RunContext,
    ) -> Iterator[tuple[Chunk, list[Any]]]:
        """Run every chunk on the workers; yield ``(chunk, results)`` in order.

        The first block is ``(None, [])``, yielded once the first chunks are
        dispatched (``STARTS_EAGERLY``). Called from the map thread. Raises
        the error of ``fn`` with its own type (remote traceback as
        ``__cause__``), ``WorkerCrashedError``,
        ``SupervisorLostError``, ``CancelledError`` or ``RunTimeoutError``;
        whatever ends the run early cancels its other chunks.
        """
        # Fails fast if the pool broke (SupervisorLostError) or belongs to
        # the parent of a forked child.
        dispatcher = self._usable_dispatcher()
        began = time.perf_counter()
        # FAULTS.md #4: pickled here, once per map, before any chunk is
        # sent: an unpicklable fn or argument is named and nothing runs.
        # Keys of the segments shared for this run only (arrays found in the
        # function, its arguments and the items): released when it ends.
        used: set[str] = set()
        try:
            fn_blob = self._dump_function(fn, extra_args, used)
            self._register_segments()
            run = dispatcher.open_run(fn_blob, ctx.recorder, ctx.cancel_grace_s)
        except BaseException:
            self._store().release(used)
            raise
        counts = MapCounts()
        counts.dispatch_overhead_s += time.perf_counter() - began
        pending: dict[int, Chunk] = {}
        # chunk index -> a RESULT outcome not yet consumed, or the results of
        # a serial re-run (force_serial_on_failure)
        done: dict[int, Any] = {}
        source = iter(chunks)
        exhausted = False
        started = False
        next_index = 0
        reason = "the run finished"
        try:
            while True:
                ctx.check()
                # Back-pressure: the bound grows with the depth the workers
                # need (tiny chunks) and stays small for big ones.
                limit = self.workers * (2 * run.depth + OUTSTANDING_SLACK)
                # Refill in batches (hysteresis): one lock round and at most
                # one wake-up for many tiny chunks.
                if not exhausted and len(pending) <= limit - max(1, limit // 4):
                    run.observe(counts.total_chunks, counts.total_compute_s)
                    counts.flush(ctx.recorder)  # adaptive chunk sizes read these
                    exhausted = self._refill(
                        dispatcher, run, source, pending, limit, counts, used
                    )
                if not pending:
                    return
                if not started:  # STARTS_EAGERLY: the first chunks go out now
                    started = True
                    dispatcher.push()
                    yield None, []
                # Errors surface as soon as they arrive (the map's other chunks
                # are then cancelled by stop_run below); results wait their turn.
                if next_index not in done:
                    for index, outcome in dispatcher.take(
                        run, next_index, POLL_INTERVAL_S
                    ):
                        kind = outcome.kind
                        if kind is _RESULT:
                            done[index] = outcome
                        elif kind is _LOST:  # its pack's worker died: again
                            self._resend(dispatcher, run, pending[index], counts, used)
                        else:  # raises, or re-runs a crashed chunk serially
                            done[index] = settle(
                                pending.get(index),
                                outcome,
                                fn,
                                extra_args,
                                ctx,
                                counts,
                                store=self._store(),
                                force_serial=self.config.force_serial_on_failure,
                            )
                # Decode what is ready, in input order, then yield it: one
                # clock pair per batch, not per chunk (W4's tiny chunks).
                if next_index not in done:
                    continue
                began = time.perf_counter()
                ready, next_index = decode_ready(done, pending, next_index, counts)
                counts.dispatch_overhead_s += time.perf_counter() - began
                yield from ready
        except GeneratorExit:
            reason = "the consumer closed the stream"
            raise
        except BaseException as exc:
            reason = f"the run stopped: {type(exc).__name__}"
            raise
        finally:
            # Whatever ended the run (done, error, cancel, timeout, Ctrl-C, a
            # consumer closing imap): stop dispatching, cancel what runs.
            counts.flush(ctx.recorder)
            dispatcher.stop_run(run, reason)
            self._store().release(used)

    def _refill(
        self,
        dispatcher: Dispatcher,
        run: Run,
        source: Iterator[Chunk],
        pending: dict[int, Chunk],
        limit: int,
        counts: MapCounts,
        used: set[str],
    ) -> bool:
        """Encode chunks until ``limit`` are outstanding; True when exhausted.

        Consecutive chunks of plain items go as packs of ``run.pack``: one
        frame each way for many tiny chunks.
        """
        began = time.perf_counter()
        batch: list[Outgoing] = []
        group: list[Chunk] = []
        exhausted = False
        now = time.monotonic()
        # A pack never outgrows worker_max_tasks: a fresh worker must be
        # able to take any pack whole.
        pack = min(run.pack, self.config.worker_max_tasks or run.pack)

        def close_group() -> None:
            if len(group) == 1:
                data = pickle.dumps(group[0].items, protocol=5)
            else:
                data = pickle.dumps([chunk.items for chunk in group], protocol=5)
            batch.append(
                Outgoing(group[0].index, group[0].start, data, now, len(group))
            )
            counts.bytes_pickled += len(data)
            group.clear()

        while len(pending) < limit:
            chunk = next(source, None)
            if chunk is None:
                exhausted = True
                break
            pending[chunk.index] = chunk
            if pack > 1 and is_plain(chunk.items):
                group.append(chunk)
                if len(group) >= pack:
                    close_group()
                continue
            if group:
                close_group()
            data = self._encode(chunk, used)
            batch.append(Outgoing(chunk.index, chunk.start, data, now))
            counts.bytes_pickled += len(data)
        if group:
            close_group()
        if batch:
            run.enqueue(batch)
            dispatcher.wake()
        counts.dispatch_overhead_s += time.perf_counter() - began
        return exhausted

    def _resend(
        self,
        dispatcher: Dispatcher,
        run: Run,
        chunk: Chunk,
        counts: MapCounts,
        used: set[str],
    ) -> None:
        """Send a chunk of a lost pack again, alone (its results never came)."""
        data = self._encode(chunk, used)
        run.enqueue([Outgoing(chunk.index, chunk.start, data, time.monotonic())])
        dispatcher.wake()
        counts.bytes_pickled += len(data)
