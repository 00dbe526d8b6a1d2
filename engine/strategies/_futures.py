"""The chunk loop shared by the future-based strategies (joblib and dask).

Both hand each chunk to a pool they do not schedule themselves, as one
future; they differ in the pool: how a chunk is submitted, what a dead
worker looks like, and how work still in flight is stopped. Those stay in
``_joblib.py`` and ``_dask.py``; what they share, on both sides, is here::

    caller thread (stream_chunks)                      a worker (loky or dask)
      submit(chunk): encode_items (plain: pickle,       run_task: (fn, extra_args)
        else the strategy's dumps), pool.submit ──────▶  once per run (CallCache),
        at most max_in_flight chunks in flight            the items, then
        (base.run_windowed: ordered, cancel, timeout)     run_chunk(as_worker=True)
      decode_outcome, in chunk order ◀───── (ok, engine._wire payload) ──
      Lost (its worker died): recover -> the strategy's Crash account ->
        rerun_or_raise: WorkerCrashedError, or a re-run in the caller
        (force_serial_on_failure)
      error / cancel / timeout / close: close the window, stop_in_flight

Nothing here imports joblib or dask: this module is imported by theirs.
"""

from __future__ import annotations

import collections
import contextlib
import pickle
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from engine._chunks import Chunk, run_chunk
from engine._wire import encode_results, is_plain, pack_error
from engine.errors import FallbackWarning, WorkerCrashedError
from engine.strategies._encoding import decode_outcome, dumps_naming, item_parts
from engine.strategies.base import (
    DeferInterrupt,
    FutureLike,
    RunContext,
    Strategy,
    run_windowed,
)

# A run's unpickled ``(fn, extra_args)``.
Call = tuple[Callable[..., Any], tuple[Any, ...]]
FutureT = TypeVar("FutureT", bound=FutureLike)


# -- the worker side -------------------------------------------------------------


class CallCache:
    """The unpickled calls of a worker's most recent runs, by run key.

    A worker unpickles a run's ``(fn, extra_args)`` once, not once per
    chunk. Called from the worker's task threads (dask may run several).
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._calls: collections.OrderedDict[str, Call] = collections.OrderedDict()

    def get(self, call_key: str, load: Callable[[], Call]) -> Call:
        """Return the call of run ``call_key``, from ``load()`` on first use."""
        with self._lock:
            cached = self._calls.get(call_key)
            if cached is not None:
                self._calls.move_to_end(call_key)
                return cached
        cached = load()
        with self._lock:
            self._calls[call_key] = cached
            while len(self._calls) > self._size:
                self._calls.popitem(last=False)
        return cached


def run_task(
    calls: CallCache,
    call_key: str,
    load_call: Callable[[], Call],
    load_items: Callable[[], list[Any]],
    *,
    start: int,
    submitted_at: float,
    is_cancelled: Callable[[], bool],
    scope: Callable[
        [], contextlib.AbstractContextManager[Any]
    ] = contextlib.nullcontext,
) -> tuple[bool, bytes]:
    """Run one chunk in a worker; return ``(ok, payload)``.

    The payload is ``engine._wire``'s format, shared with the processes
    strategy: per-item result pickles (a failure names its item) or an
    exception with its remote traceback. An error travels as a value: dask
    would pickle the exception without ``__cause__`` and log it. ``scope``
    is entered around the calls of ``fn`` only.
    """
    wait_s = max(0.0, time.time() - submitted_at)  # dask: clocks of two machines
    where = "function"
    try:
        fn, extra_args = calls.get(call_key, load_call)
        where = "items"
        items = load_items()
        where = "fn"
        with scope():
            results, compute_s = run_chunk(
                fn, items, extra_args, is_cancelled=is_cancelled, as_worker=True
            )
        return True, b"".join(encode_results(results, start, compute_s, wait_s))
    except BaseException as exc:  # fn calling sys.exit() is reported too
        return False, pack_error(exc, where=where)


# -- the caller side -------------------------------------------------------------


class NotDoneError(Exception):
    """A poll found the chunk still running (never escapes the strategies)."""


@dataclass(frozen=True, slots=True)
class Lost:
    """The outcome of a chunk whose worker died under it."""

    error: BaseException
    # The joblib pool the chunk ran on: a death there breaks the whole pool.
    # Dask replaces its workers one by one and leaves it 0.
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Crash:
    """A strategy's account of the worker death that lost a chunk."""

    what: str  # how the chunk was lost: the error's and the warning's first words
    status: str  # what is still usable, for the error
    cause: BaseException  # the pool's own error, the WorkerCrashedError's cause
    exitcode: int | None = None
    signal_name: str | None = None


def encode_items(chunk: Chunk, dumps: Callable[[Any], bytes], *, workers: str) -> bytes:
    """Pickle a chunk's items: plain ones directly, others with ``dumps``.

    ``workers`` names where they go, for the error naming an unpicklable item.
    """
    items = list(chunk.items)
    if is_plain(items):
        return pickle.dumps(items, protocol=5)
    return dumps_naming(dumps, items, item_parts(chunk), workers=workers)


def stream_chunks(
    submit: Callable[[Chunk], tuple[FutureT, int]],
    chunks: Iterable[Chunk],
    ctx: RunContext,
    *,
    max_in_flight: int,
    recover: Callable[[Chunk, Lost], list[Any]],
    stop_in_flight: Callable[[Iterable[FutureT], BaseException], None],
) -> Iterator[tuple[Chunk, list[Any]]]:
    """Run every chunk as a future; yield ``(chunk, results)`` in chunk order.

    ``submit`` sends one chunk and returns its future and the bytes pickled
    for it. A future's result is the worker's ``(ok, payload)``, or ``Lost``,
    which ``recover`` turns into the chunk's results or an error (after
    ``ctx.check()``: a cancelled run raises ``CancelledError``). Whatever
    ends the run early (an error, cancel, timeout, the consumer closing the
    stream) cancels it, then hands ``stop_in_flight`` the exception and the
    futures submitted (the leading done ones are dropped as chunks go out).
    """
    submitted: collections.deque[FutureT] = collections.deque()

    def submit_tracked(chunk: Chunk) -> FutureT:
        began = time.perf_counter()
        future, nbytes = submit(chunk)
        while submitted and submitted[0].done():
            submitted.popleft()
        submitted.append(future)
        ctx.recorder.add(
            dispatch_overhead_s=time.perf_counter() - began, bytes_pickled=nbytes
        )
        return future

    windowed = run_windowed(
        submit_tracked,
        chunks,
        ctx,
        max_in_flight=max_in_flight,
        timeout_errors=(NotDoneError,),
    )
    try:
        for chunk, outcome in windowed:
            if isinstance(outcome, Lost):
                ctx.check()  # a shutdown or cancel, not a crash, may have ended it
                with DeferInterrupt():  # recover replaces the pool
                    results = recover(chunk, outcome)
                yield chunk, results
                continue
            yield chunk, decode_outcome(chunk, outcome, ctx)
    except BaseException as exc:
        # Closing the window first cancels the run and its queued chunks
        # (it is still open when our consumer closed us: GeneratorExit).
        # A second Ctrl-C waits until the pool is stopped (DeferInterrupt).
        with DeferInterrupt():
            windowed.close()
            stop_in_flight(submitted, exc)
        raise


def rerun_or_raise(
    strategy: Strategy,
    fn: Callable[..., Any],
    chunk: Chunk,
    extra_args: tuple[Any, ...],
    ctx: RunContext,
    crash: Crash,
) -> list[Any]:
    """Count a lost chunk; raise ``WorkerCrashedError`` or run it in the caller.

    With ``force_serial_on_failure`` the chunk runs here, with the original
    ``fn`` and locally resolved payloads, and a ``FallbackWarning``.
    """
    ctx.recorder.add(failures=1)
    if not strategy.config.force_serial_on_failure:
        msg = (
            f"{crash.what}. {crash.status} To re-run lost chunks serially instead, "
            "set ParallelConfig(force_serial_on_failure=True) (CE_PARALLEL token "
            "force_serial=on)."
        )
        raise WorkerCrashedError(
            msg,
            exitcode=crash.exitcode,
            signal_name=crash.signal_name,
            chunk_index=chunk.index,
        ) from crash.cause
    reason = f"{crash.what}; re-ran chunk {chunk.index} serially in the caller"
    # 2: the strategy's own recovery, which called this.
    warnings.warn(reason, FallbackWarning, stacklevel=2)
    ctx.recorder.record_fallback(reason, requested=strategy.NAME, chunk=chunk.index)
    assert strategy.payloads is not None, "the executor passes a PayloadStore"
    local_args = strategy.payloads.resolve_local(extra_args)
    results, compute_s = run_chunk(
        fn, chunk.items, local_args, is_cancelled=ctx.is_cancelled, as_worker=False
    )
    ctx.recorder.add(chunks=1, items=len(chunk), compute_s=compute_s)
    return results
