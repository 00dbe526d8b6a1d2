"""The joblib strategy: chunks on a private loky executor, payloads in shared memory.

::

    caller thread (run)                                  loky workers (N, started by
      payloads.dumps((fn, extra_args)) ─ once per run     loky's spawn-like method,
      payloads.dumps(chunk.items)  ─ per chunk            env: BLAS/OMP/numba caps)
      executor.submit(_run_task, ...) ── call queue ────▶ _run_task: loads + resolve
        │  at most 2 x workers chunks in flight            (refs -> attach(): zero-
        │  (stream_chunks: ordered, cancel, timeout)        copy read-only views),
        ◀────────── per-item result pickles, compute_s ── run_chunk(as_worker=True)
      cancel/timeout/error: cancel board slot := run      checks the cancel board
        generation; wait cancel_grace_s; then kill the     between items
        loky executor and start a fresh one

Why a private ``loky`` ``ProcessPoolExecutor`` and not ``joblib.Parallel``:
every chunk is one future, so a crash, an error or a cancel is tied to a
chunk index; ``engine.strategies._futures`` gives the same bounded,
ordered streaming, cancel, timeout and crash recovery as the dask
strategy; and killing a stuck pool never touches joblib's process-wide
reusable executor, which the user's own ``joblib.Parallel`` calls may be
using. Large arrays travel as
``PayloadRef`` handles made by ``PayloadStore.dumps``: joblib's memmapping
is never involved.

A loky worker that dies breaks the whole loky pool (loky flags it broken
and fails every pending future), so every chunk in flight at that moment is
lost; the map raises ``WorkerCrashedError`` naming the first, or re-runs the
lost chunks serially with ``force_serial_on_failure``. The next chunks go
to a fresh pool.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import functools
import itertools
import mmap
import os
import re
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final, final

from joblib import parallel_config
from joblib.externals.loky.backend.context import get_context
from joblib.externals.loky.process_executor import (
    BrokenProcessPool,
    ProcessPoolExecutor,
    ShutdownExecutorError,
)

from engine import _env, payload
from engine._chunks import Chunk
from engine._context import thread_cap
from engine._state import mark_worker_process
from engine.errors import ConfigError
from engine.strategies import _futures
from engine.strategies._encoding import call_parts, dumps_naming
from engine.strategies.base import RunContext, Strategy

if TYPE_CHECKING:
    from engine.config import ParallelConfig
    from engine.payload import PayloadStore

__all__ = ["JoblibStrategy"]

# Chunks in flight per worker: one running, one queued in loky's call queue
# so a worker never idles between chunks (as the threads strategy).
IN_FLIGHT_PER_WORKER: Final = 2
# Runs that may be cancelled at once before two share a board slot; a slot
# stores the generation, so sharing never cancels the wrong run.
BOARD_SLOTS: Final = 64
# Unpickled (fn, extra_args) kept per worker: one per recent run.
CALL_CACHE_SIZE: Final = 4
# loky's own start method: fork+exec of a fresh interpreter on POSIX (spawn
# semantics without re-importing __main__), spawn on Windows. It is the only
# loky context that applies ``env=`` before the worker imports numpy.
LOKY_START_METHOD: Final = "loky"
# How often a worker checks that the caller is alive; a SIGKILLed caller's
# workers are gone within this (FAULTS.md #7 asks for 3 s).
PARENT_POLL_S: Final = 0.25
_EXIT_CODES_RE: Final = re.compile(r"([A-Z][A-Z0-9]*)?\((-?\d+)\)")
_LOST_ERRORS: Final = (BrokenProcessPool, ShutdownExecutorError)


# -- the cancel board: one int64 per slot in a small file-backed mmap ----------


class _CancelBoard:
    """Slot ``i`` holds the generation of the last run cancelled in slot ``i``.

    The caller writes; workers map the file read-only and compare with their
    run's generation between items (a few hundred ns). A file, not a
    ``cepe_*`` segment: the payload store owns those, and loky cannot pass
    ``multiprocessing`` shared ctypes to its workers.
    """

    def __init__(self, path: str, *, writable: bool) -> None:
        self.path = path
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(path, flags)
        try:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map = mmap.mmap(fd, BOARD_SLOTS * 8, access=access)
        finally:
            os.close(fd)

    @classmethod
    def create(cls) -> _CancelBoard:
        fd, path = tempfile.mkstemp(prefix="cepe-cancel-", suffix=".bin")
        try:
            os.write(fd, bytes(BOARD_SLOTS * 8))
        finally:
            os.close(fd)
        return cls(path, writable=True)

    def mark(self, generation: int) -> None:
        struct.pack_into("<q", self._map, (generation % BOARD_SLOTS) * 8, generation)

    def is_marked(self, generation: int) -> bool:
        offset = (generation % BOARD_SLOTS) * 8
        return struct.unpack_from("<q", self._map, offset)[0] == generation

    def close(self, *, unlink: bool) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


# -- the worker side -------------------------------------------------------------

_worker_board: _CancelBoard | None = None
_worker_calls = _futures.CallCache(CALL_CACHE_SIZE)


def _watch_parent(parent_pid: int, board_path: str) -> None:
    """Exit this worker once the caller is gone (FAULTS.md #7)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    with contextlib.suppress(OSError):
        os.unlink(board_path)  # the caller died before it could
    os._exit(1)


def _init_worker(board_path: str, parent_pid: int) -> None:
    """Loky initializer: mark the process as an engine worker, map the board."""
    global _worker_board
    mark_worker_process()
    _worker_board = _CancelBoard(board_path, writable=False)
    # loky workers outlive a SIGKILLed caller (measured: still alive after 10 s
    # with no idle timeout) and keep the resource tracker, and so our shared
    # memory, alive. Not PR_SET_PDEATHSIG: it fires when the *thread* that
    # started the worker exits, and loky may start workers from any thread.
    threading.Thread(
        target=_watch_parent,
        args=(parent_pid, board_path),
        name="engine-joblib-watchdog",
        daemon=True,
    ).start()


def _load_call(call_blob: bytes) -> _futures.Call:
    fn, extra_args = payload.loads(call_blob)
    return fn, payload.resolve(tuple(extra_args))


def _run_task(
    call_key: str,
    call_blob: bytes,
    items_blob: bytes,
    start: int,
    generation: int,
    submitted_at: float,
) -> tuple[bool, bytes]:
    """Run one chunk in a loky worker; return ``(ok, payload)`` (``run_task``)."""
    board = _worker_board

    def is_cancelled() -> bool:
        return board is not None and board.is_marked(generation)

    return _futures.run_task(
        _worker_calls,
        call_key,
        functools.partial(_load_call, call_blob),
        functools.partial(payload.loads, items_blob),
        start=start,
        submitted_at=submitted_at,
        is_cancelled=is_cancelled,
        # joblib's own rule for Parallel nested in a loky worker: threads
        # (LokyBackend.get_nested_backend), never a process pool per worker.
        scope=functools.partial(parallel_config, backend="threading"),
    )


def _warm_up() -> int:
    return os.getpid()


# -- the caller side -------------------------------------------------------------


class _Pending:
    """One chunk's loky future, as ``run_windowed`` wants it.

    ``result`` separates "not finished yet" (``NotDoneError``) from a task that
    itself raised ``TimeoutError``, returns ``Lost`` for a broken pool, and
    resubmits a chunk whose pool this strategy killed on purpose (another
    run's forced cancel).
    """

    __slots__ = ("_resubmit", "epoch", "future")

    def __init__(
        self,
        future: concurrent.futures.Future,
        epoch: int,
        resubmit: Callable[[int], tuple[concurrent.futures.Future, int] | None],
    ) -> None:
        self.future = future
        self.epoch = epoch
        self._resubmit = resubmit

    def result(self, timeout: float | None = None) -> Any:
        try:
            error = self.future.exception(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise _futures.NotDoneError from None
        if error is None:
            return self.future.result()
        if isinstance(error, _LOST_ERRORS):
            again = self._resubmit(self.epoch)
            if again is not None:
                self.future, self.epoch = again
                raise _futures.NotDoneError
            return _futures.Lost(error, self.epoch)
        raise error

    def cancel(self) -> bool:
        # Never cancel a loky future: when the pool is later killed, loky's
        # manager thread sets an exception on every future it still tracks and
        # dies with InvalidStateError on a cancelled one, leaving its workers
        # alive. Queued chunks stop at their first item through the board.
        return False

    def done(self) -> bool:
        return self.future.done()


def _crash_details(error: BaseException) -> tuple[str | None, int | None]:
    """Signal name and exit code from loky's "exit codes ... {SIGKILL(-9)}"."""
    match = _EXIT_CODES_RE.search(str(error).split("exit codes", 1)[-1])
    if match is None:
        return None, None
    return match.group(1), int(match.group(2))


@final
class JoblibStrategy(Strategy):
    """Run chunks on a private loky process pool (joblib's backend).

    Called from the caller's thread that runs the map, except ``cancel``
    and ``shutdown``, which any thread may call.
    """

    NAME: ClassVar[str] = "joblib"
    IN_PROCESS: ClassVar[bool] = False

    def __init__(
        self,
        config: ParallelConfig,
        *,
        workers: int,
        payloads: PayloadStore | None = None,
    ) -> None:
        super().__init__(config, workers=workers, payloads=payloads)
        if config.start_method not in (None, "spawn"):
            msg = (
                f"ParallelConfig.start_method={config.start_method!r} is not supported "
                "by the joblib strategy: loky starts its workers with its own "
                "spawn-like method and forking the multi-threaded caller is unsafe. "
                "Use start_method=None or 'spawn', or strategy='processes' (its "
                "supervisor forks workers safely)."
            )
            raise ConfigError(msg)
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._epoch = 0
        self._killed_epochs: set[int] = set()
        self._board: _CancelBoard | None = None
        self._generations = itertools.count(1)
        self._run_prefix = uuid.uuid4().hex[:12]
        self._counted_refs: set[str] = set()
        self._closed = False

    @property
    def start_method(self) -> str | None:
        return LOKY_START_METHOD

    @property
    def thread_cap(self) -> int | None:
        return thread_cap(self.workers)

    # -- pool lifecycle (any thread; guarded by self._lock) -------------------------

    def start(self) -> None:
        with self._lock:
            executor, _ = self._executor_locked()
        # loky starts every worker process inside the first submit; do it now so
        # the first map finds a warm pool. Not awaited: imports finish meanwhile.
        executor.submit(_warm_up)

    def _executor_locked(self) -> tuple[ProcessPoolExecutor, int]:
        if self._closed:
            msg = "the joblib strategy was shut down; create a new ParallelExecutor"
            raise ShutdownExecutorError(msg)
        if self._board is None:
            self._board = _CancelBoard.create()
        if self._executor is None:
            if self._epoch == 0:
                # FAULTS.md #18: an executor never closed still kills its
                # workers at exit (before loky's own hook joins them).
                atexit.register(self.shutdown)
            self._epoch += 1
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                context=get_context(LOKY_START_METHOD),
                initializer=_init_worker,
                initargs=(self._board.path, os.getpid()),
                env=_env.worker_environment(thread_cap(self.workers)),
                timeout=None,  # workers live as long as the strategy: no idle exit
            )
        return self._executor, self._epoch

    def _current(self) -> tuple[ProcessPoolExecutor, int]:
        with self._lock:
            return self._executor_locked()

    def _discard(self, epoch: int, *, on_purpose: bool, restart: bool = True) -> bool:
        """Kill the pool of ``epoch`` if it is still current; True if it was.

        ``restart``: start the replacement now; otherwise the next chunk does.
        """
        with self._lock:
            if self._executor is None or epoch != self._epoch:
                return False
            executor, self._executor = self._executor, None
            if on_purpose:
                self._killed_epochs.add(epoch)
        # kill_workers: loky terminates the worker process trees at once instead
        # of letting running chunks finish (forced cancel, FAULTS.md #9).
        executor.shutdown(wait=True, kill_workers=True)
        # Start the replacements now, so their start-up overlaps the caller
        # handling the error instead of delaying the next map.
        if restart:
            with contextlib.suppress(ShutdownExecutorError):
                self.start()
        return True

    def _resubmitter(
        self, submit_task: Callable[[ProcessPoolExecutor], concurrent.futures.Future]
    ) -> Callable[[int], tuple[concurrent.futures.Future, int] | None]:
        def resubmit(epoch: int) -> tuple[concurrent.futures.Future, int] | None:
            if epoch not in self._killed_epochs:
                return None  # a real crash, not our own forced cancel
            executor, current = self._current()
            return submit_task(executor), current

        return resubmit

    def cancel(self) -> None:
        """Kill the workers now; the next chunk starts a fresh pool."""
        with self._lock:
            epoch = self._epoch
        self._discard(epoch, on_purpose=True)

    def shutdown(self, *, wait: bool = True) -> None:
        atexit.unregister(self.shutdown)
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            board, self._board = self._board, None
        if executor is not None:
            # Always kill: loky would otherwise keep idle workers alive, and a
            # stuck chunk would hold the shutdown forever.
            executor.shutdown(wait=wait, kill_workers=True)
        if board is not None:
            board.close(unlink=True)

    # -- one run -------------------------------------------------------------------

    def _count_shared(self, extra_args: tuple[Any, ...], before: int) -> int:
        """Bytes shared for this run: new auto-shared arrays, first use of refs."""
        assert self.payloads is not None
        counted = self.payloads.bytes_shared - before
        for arg in extra_args:
            if (
                isinstance(arg, payload.PayloadRef)
                and arg.key not in self._counted_refs
            ):
                self._counted_refs.add(arg.key)
                counted += arg.nbytes
        return counted

    def run(
        self,
        fn: Callable[..., Any],
        chunks: Iterable[Chunk],
        extra_args: tuple[Any, ...],
        ctx: RunContext,
    ) -> Iterator[tuple[Chunk, list[Any]]]:
        assert self.payloads is not None, "the executor passes a PayloadStore"
        payloads = self.payloads
        generation = next(self._generations)
        call_key = f"{self._run_prefix}-{generation}"
        started = time.perf_counter()
        shared_before = payloads.bytes_shared
        call_blob = dumps_naming(
            payloads.dumps,
            (fn, extra_args),
            call_parts(fn, extra_args),
            workers="the joblib workers",
        )
        ctx.recorder.add(
            dispatch_overhead_s=time.perf_counter() - started,
            bytes_shared=self._count_shared(extra_args, shared_before),
        )

        def submit(chunk: Chunk) -> tuple[_Pending, int]:
            items_blob = _futures.encode_items(
                chunk, payloads.dumps, workers="the joblib workers"
            )

            def submit_task(executor: ProcessPoolExecutor) -> concurrent.futures.Future:
                return executor.submit(
                    _run_task,
                    call_key,
                    call_blob,
                    items_blob,
                    chunk.start,
                    generation,
                    time.time(),
                )

            executor, epoch = self._current()
            try:
                future = submit_task(executor)
            except _LOST_ERRORS:
                # The pool broke (a crash) or was killed since the last chunk.
                # Count the replacement here when this is what discards it:
                # _recover then finds the epoch gone and counts nothing (the
                # race left a crashed run with 0 restarts in its telemetry).
                if self._discard(epoch, on_purpose=False):
                    ctx.recorder.add(worker_restarts=self.workers)
                executor, epoch = self._current()
                future = submit_task(executor)
            pending = _Pending(future, epoch, self._resubmitter(submit_task))
            return pending, len(call_blob) + len(items_blob)

        yield from _futures.stream_chunks(
            submit,
            chunks,
            ctx,
            max_in_flight=self.workers * IN_FLIGHT_PER_WORKER,
            recover=lambda chunk, lost: self._recover(fn, chunk, extra_args, lost, ctx),
            stop_in_flight=lambda submitted, exc: self._stop_in_flight(
                submitted, generation, ctx, exc
            ),
        )

    def _recover(
        self,
        fn: Callable[..., Any],
        chunk: Chunk,
        extra_args: tuple[Any, ...],
        lost: _futures.Lost,
        ctx: RunContext,
    ) -> list[Any]:
        """A chunk's pool broke: raise ``WorkerCrashedError`` or run it here."""
        if self._discard(lost.epoch, on_purpose=False):
            ctx.recorder.add(worker_restarts=self.workers)
        signal_name, exitcode = _crash_details(lost.error)
        crash = _futures.Crash(
            what=(
                f"a joblib (loky) worker died (exit code {exitcode}, {signal_name}) "
                f"while chunk {chunk.index} (items {chunk.start}.."
                f"{chunk.start + len(chunk) - 1}) was in flight; loky fails every "
                "chunk in flight when one worker dies"
            ),
            status="The executor stays usable.",
            cause=lost.error,
            exitcode=exitcode,
            signal_name=signal_name,
        )
        return _futures.rerun_or_raise(self, fn, chunk, extra_args, ctx, crash)

    def _stop_in_flight(
        self,
        submitted: Iterable[_Pending],
        generation: int,
        ctx: RunContext,
        exc: BaseException,
    ) -> None:
        """Stop this run's chunks: cooperatively, then by killing the pool."""
        running = [pending for pending in submitted if not pending.done()]
        if not running:
            return
        with self._lock:
            board = self._board
        if board is not None:
            board.mark(generation)  # workers stop at their next item
        # Ctrl-C must propagate within 1 s (FAULTS.md #8): no grace period,
        # and no fresh pool started for a caller that is most likely quitting.
        interrupted = not isinstance(exc, Exception | GeneratorExit)
        grace_s = 0.0 if interrupted else ctx.cancel_grace_s
        futures = [pending.future for pending in running]
        _, stuck = concurrent.futures.wait(futures, timeout=grace_s)
        if stuck:
            for epoch in {pending.epoch for pending in running if not pending.done()}:
                if self._discard(epoch, on_purpose=True, restart=not interrupted):
                    ctx.recorder.add(worker_restarts=self.workers)
