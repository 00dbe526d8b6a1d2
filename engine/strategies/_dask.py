"""The dask strategy: chunks as tasks on a Dask distributed cluster.

::

    caller process                                   dask scheduler ── dask workers
      Client ── ParallelConfig.dask_address, or a     (remote, or the LocalCluster
        LocalCluster this strategy owns (processes,    owned here: one process per
        max_workers workers, 1 thread each)            worker, 1 thread, thread caps)
      per run: pickle (fn, extra_args) with big
        arrays and PayloadRefs as keys ──────────────▶ scatter(broadcast=True), once
        per executor per array/ref, kept as futures     per executor; workers keep
      client.submit(_run_chunk, blob, items, {key:     the data in memory
        future}) ── at most 2 x threads in flight ──▶ _run_chunk: unpickle with the
        (stream_chunks: ordered, cancel, timeout)      data by key (read-only views),
        ◀──────────── per-item result pickles ──────── run_chunk(as_worker=True)
      cancel/timeout/error: cancel futures, mark the run cancelled on every
        worker (client.run); owned cluster: kill workers still busy after
        cancel_grace_s (their nannies start fresh ones)

Shared memory does not cross machines, so ``PayloadRef`` handles are
resolved in the caller (``PayloadStore.local``) and their values scattered
instead; arrays of at least ``shm_threshold_bytes`` anywhere in ``fn``'s
closure, in the extra arguments or in the items are scattered once per
executor, keyed by identity. Scattered bytes count as ``bytes_shared``.

A worker that dies fails the chunks it held (``distributed.KilledWorker``)
with ``WorkerCrashedError``, or they re-run serially in the caller with
``force_serial_on_failure``. On the cluster this strategy owns the scheduler
gives up at the first death (``allowed-failures=0``); a remote scheduler
applies its own setting (dask's default retries a task on 3 more workers).

The chunk loop, the worker's task body and the recovery of lost chunks are
shared with the joblib strategy (``engine.strategies._futures``).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import io
import itertools
import logging
import os
import pickle
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Final, final

import cloudpickle
import dask
import distributed
import numpy as np

from engine import _env
from engine._chunks import Chunk
from engine._context import thread_cap
from engine.errors import BrokenExecutorError, StrategyUnavailableError
from engine.payload import PayloadRef, readonly_view
from engine.strategies import _futures
from engine.strategies._encoding import call_parts, dumps_naming
from engine.strategies.base import RunContext, Strategy

if TYPE_CHECKING:
    from engine.config import ParallelConfig
    from engine.payload import PayloadStore

__all__ = ["DaskStrategy"]

# Chunks in flight per worker thread: one running, one waiting on the worker
# so a thread never idles on a scheduler round trip.
IN_FLIGHT_PER_THREAD: Final = 2
# A pickled (fn, extra_args) larger than this is scattered once per run
# instead of travelling inside every task.
INLINE_CALL_BYTES: Final = 64 * 1024
# How long to wait for a scheduler given by address.
CONNECT_TIMEOUT_S: Final = 10.0
# How long to wait for the scheduler to notice workers we killed (it sees
# their connections close within milliseconds).
WORKER_REMOVAL_TIMEOUT_S: Final = 5.0
# Unpickled (fn, extra_args) kept per worker process: one per recent run.
CALL_CACHE_SIZE: Final = 4
# Cancelled run keys remembered per worker process.
CANCELLED_MEMORY: Final = 256
_KEY_PREFIX: Final = "cepe-"
# Scheduler settings of the cluster this strategy owns (read when the
# in-process scheduler starts):
# - allowed-failures=0: a worker that dies fails the chunks it held at once
#   (WorkerCrashedError, FAULTS.md #1) instead of dask retrying them on the
#   next worker, which a crashing chunk would kill too;
# - no active memory manager: its ReduceReplicas policy drops broadcast
#   replicas after ~2 s, so every worker fetched and unpickled shared data
#   again (measured: a shared object got a second identity on one worker).
OWNED_SCHEDULER_CONFIG: Final = {
    "distributed.scheduler.allowed-failures": 0,
    "distributed.scheduler.active-memory-manager.start": False,
}
_KILL_SIGNAL: Final = getattr(signal, "SIGKILL", signal.SIGTERM)  # Windows: SIGTERM


# -- the worker side -------------------------------------------------------------

_worker_calls = _futures.CallCache(CALL_CACHE_SIZE)
_cancelled_runs: collections.deque[str] = collections.deque(maxlen=CANCELLED_MEMORY)


class _DataUnpickler(pickle.Unpickler):
    """Unpickler whose persistent ids are keys of data scattered to the worker."""

    def __init__(self, file: io.BytesIO, data: dict[str, Any]) -> None:
        super().__init__(file)
        self._data = data

    def persistent_load(self, pid: Any) -> Any:
        return readonly_view(self._data[pid])


def _load(blob: bytes, data: dict[str, Any]) -> Any:
    return _DataUnpickler(io.BytesIO(blob), data).load()


def _load_call(call_blob: bytes, data: dict[str, Any]) -> _futures.Call:
    fn, extra_args = _load(call_blob, data)
    return fn, tuple(extra_args)


def _run_chunk(
    call_key: str,
    call_blob: bytes,
    items_blob: bytes,
    data: dict[str, Any],
    start: int,
    submitted_at: float,
) -> tuple[bool, bytes]:
    """Run one chunk on a dask worker; return ``(ok, payload)`` (``run_task``)."""
    return _futures.run_task(
        _worker_calls,
        call_key,
        functools.partial(_load_call, call_blob, data),
        functools.partial(_load, items_blob, data),
        start=start,
        submitted_at=submitted_at,
        is_cancelled=lambda: call_key in _cancelled_runs,
    )


def _mark_cancelled(call_key: str) -> None:
    """Run on every worker by ``client.run``: the run's chunks stop at their next item."""
    _cancelled_runs.append(call_key)


def _executing_keys(prefix: str, dask_worker: distributed.Worker) -> list[str]:
    """Run on every worker by ``client.run``: keys of ``prefix`` still executing.

    ``executing`` includes tasks cancelled while their thread still runs.
    """
    return [
        str(task.key)
        for task in list(dask_worker.state.executing)
        if str(task.key).startswith(prefix)
    ]


# -- the caller side -------------------------------------------------------------


class _KeyPickler(cloudpickle.Pickler):
    """cloudpickle that leaves big arrays and ``PayloadRef``s out, as keys.

    Each key lands in ``found``; the caller scatters its value once per
    executor and the worker's ``_DataUnpickler`` puts the data back.
    """

    def __init__(
        self, file: io.BytesIO, threshold_bytes: int, found: dict[str, Any]
    ) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._threshold_bytes = threshold_bytes
        self._found = found

    def persistent_id(self, obj: Any) -> str | None:
        if isinstance(obj, PayloadRef):
            key = f"ref:{obj.key}"
        elif (
            type(obj) is np.ndarray
            and obj.nbytes >= self._threshold_bytes
            and not obj.dtype.hasobject
        ):
            key = f"id:{id(obj)}"
        else:
            return None
        self._found[key] = obj
        return key


class _Pending:
    """One chunk's dask future, as ``run_windowed`` wants it.

    ``result`` returns ``Lost`` for a chunk whose worker died (``KilledWorker``).
    """

    __slots__ = ("_finished", "chunk_index", "future")

    def __init__(self, future: distributed.Future, chunk_index: int) -> None:
        self.future = future
        self.chunk_index = chunk_index
        self._finished = threading.Event()
        # Called on a dask callback thread when the future finishes, errs or
        # is cancelled: waiting costs no scheduler round trip per poll.
        future.add_done_callback(lambda _: self._finished.set())

    def result(self, timeout: float | None = None) -> Any:
        if not self._finished.wait(timeout):
            raise _futures.NotDoneError
        status = self.future.status
        if status == "finished":
            return self.future.result()
        if status == "error":
            error = self.future.exception()
            if isinstance(error, distributed.KilledWorker):
                return _futures.Lost(error)
            raise error
        msg = (
            f"dask reported chunk {self.chunk_index} as {status} although this run "
            "was not cancelled: the connection to the scheduler was lost or someone "
            "cancelled its key; check the scheduler and create a new executor"
        )
        raise BrokenExecutorError(msg)

    def cancel(self) -> bool:
        self.future.cancel()
        return True

    def done(self) -> bool:
        return self._finished.is_set()


@final
class DaskStrategy(Strategy):
    """Run chunks as tasks on a Dask distributed cluster.

    Connects to ``ParallelConfig.dask_address``, or starts and owns a
    ``distributed.LocalCluster``. Called from the caller's thread that runs
    the map, except ``cancel`` and ``shutdown``, which any thread may call.
    """

    NAME: ClassVar[str] = "dask"
    IN_PROCESS: ClassVar[bool] = False

    def __init__(
        self,
        config: ParallelConfig,
        *,
        workers: int,
        payloads: PayloadStore | None = None,
    ) -> None:
        super().__init__(config, workers=workers, payloads=payloads)
        self._lock = threading.Lock()
        self._client: distributed.Client | None = None
        self._cluster: distributed.LocalCluster | None = None
        self._closed = False
        # Scattered data, once per executor: key -> future, and the objects
        # behind identity keys, kept alive so their ids stay unique.
        self._scattered: dict[str, distributed.Future] = {}
        self._pinned: dict[str, Any] = {}
        self._run_prefix = f"{_KEY_PREFIX}{uuid.uuid4().hex[:12]}"
        self._generations = itertools.count(1)

    @property
    def owns_cluster(self) -> bool:
        """True when this strategy started the cluster (no ``dask_address``)."""
        return self.config.dask_address is None

    @property
    def start_method(self) -> str | None:
        # The nanny spawns (distributed.worker.multiprocessing-method's default).
        return "spawn" if self.owns_cluster else None

    @property
    def thread_cap(self) -> int | None:
        return thread_cap(self.workers) if self.owns_cluster else None

    # -- cluster lifecycle ---------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._closed:
                msg = "the dask strategy was shut down; create a new ParallelExecutor"
                raise BrokenExecutorError(msg)
            if self._client is not None:
                return
            address = self.config.dask_address
            if address is None:
                self._client, self._cluster = self._start_local_cluster()
            else:
                self._client = self._connect(address)
            # FAULTS.md #18: an executor never closed is shut down at exit, and
            # before distributed's own exit hooks (atexit runs them in reverse),
            # so scattered data is released before its workers go.
            atexit.register(self.shutdown)

    def _start_local_cluster(
        self,
    ) -> tuple[distributed.Client, distributed.LocalCluster]:
        try:
            cluster = self._new_local_cluster()
        except Exception as exc:
            msg = (
                f"cannot start a dask LocalCluster of {self.workers} worker processes "
                f"({type(exc).__name__}: {exc}). Dask spawns its workers and each "
                "imports your main module: a script that creates the executor at "
                'module level must do so under `if __name__ == "__main__":`. Or '
                "connect to a running scheduler with ParallelConfig.dask_address "
                "(CE_PARALLEL token dask=)."
            )
            raise StrategyUnavailableError(msg) from exc
        try:
            return distributed.Client(cluster, set_as_default=False), cluster
        except BaseException:
            cluster.close()
            raise

    def _new_local_cluster(self) -> distributed.LocalCluster:
        with dask.config.set(OWNED_SCHEDULER_CONFIG):
            return distributed.LocalCluster(
                n_workers=self.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                scheduler_port=0,  # random free ports: never a fixed 8786
                # ":0", not None: None still binds the default port 8787.
                dashboard_address=":0",
                silence_logs=logging.ERROR,
                env=_env.worker_environment(thread_cap(self.workers)),
            )

    def _connect(self, address: str) -> distributed.Client:
        # A run limited to timeout_s does not wait longer than that to connect.
        timeout_s = min(CONNECT_TIMEOUT_S, self.config.timeout_s or CONNECT_TIMEOUT_S)
        try:
            return distributed.Client(address, timeout=timeout_s, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            msg = (
                f"cannot reach the dask scheduler at dask_address={address!r} within "
                f"{timeout_s:g} s ({exc}). Start one (`dask scheduler`, then "
                "`dask worker ADDRESS` on each machine) or fix the address "
                "(ParallelConfig.dask_address, CE_PARALLEL token dask=)."
            )
            raise StrategyUnavailableError(msg) from exc

    def shutdown(self, *, wait: bool = True) -> None:
        atexit.unregister(self.shutdown)
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            cluster, self._cluster = self._cluster, None
            self._scattered.clear()
            self._pinned.clear()
        # Closing the client releases every scattered future; closing the
        # cluster stops its nannies and worker processes (joined: no leaks).
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        if cluster is not None:
            cluster.close()

    # -- data sharing ------------------------------------------------------------

    def _pickle_with_keys(self, obj: Any, found: dict[str, Any]) -> bytes:
        """Pickle ``obj`` with big arrays and refs as keys into ``found``."""
        buffer = io.BytesIO()
        _KeyPickler(buffer, self.config.shm_threshold_bytes, found).dump(obj)
        return buffer.getvalue()

    def _scatter(
        self, client: distributed.Client, found: dict[str, Any], ctx: RunContext
    ) -> dict[str, distributed.Future]:
        """Scatter what ``found`` names, once per executor; return its futures."""
        futures = {}
        for key, value in found.items():
            with self._lock:
                future = self._scattered.get(key)
            if future is None or future.status != "finished":  # "lost": scatter again
                data = value
                if isinstance(value, PayloadRef):
                    assert self.payloads is not None, "passed by the executor"
                    data = self.payloads.local(value)
                # A list of one: scatter() would split a shared list into items.
                future = client.scatter([data], broadcast=True, hash=False)[0]
                ctx.recorder.add(bytes_shared=value.nbytes)
                with self._lock:
                    self._scattered[key] = future
                    if key.startswith("id:"):
                        self._pinned[key] = value
            futures[key] = future
        return futures

    # -- one run -------------------------------------------------------------------

    def run(
        self,
        fn: Callable[..., Any],
        chunks: Iterable[Chunk],
        extra_args: tuple[Any, ...],
        ctx: RunContext,
    ) -> Iterator[tuple[Chunk, list[Any]]]:
        self.start()
        client = self._client
        assert client is not None, "start() raises once shut down"
        call_key = f"{self._run_prefix}-{next(self._generations)}"
        started = time.perf_counter()
        found: dict[str, Any] = {}
        call_blob = dumps_naming(
            functools.partial(self._pickle_with_keys, found=found),
            (fn, extra_args),
            call_parts(fn, extra_args),
            workers="the dask workers",
        )
        call_data = self._scatter(client, found, ctx)
        call_arg: Any = call_blob
        if len(call_blob) > INLINE_CALL_BYTES:
            call_arg = client.scatter([call_blob], hash=False)[0]
        ctx.recorder.add(dispatch_overhead_s=time.perf_counter() - started)
        threads = max(1, sum(client.nthreads().values()))

        def submit(chunk: Chunk) -> tuple[_Pending, int]:
            item_refs: dict[str, Any] = {}
            items_blob = _futures.encode_items(
                chunk,
                functools.partial(self._pickle_with_keys, found=item_refs),
                workers="the dask workers",
            )
            data = {**call_data, **self._scatter(client, item_refs, ctx)}
            future = client.submit(
                _run_chunk,
                call_key,
                call_arg,
                items_blob,
                data,
                chunk.start,
                time.time(),
                key=f"{call_key}-{chunk.index}",
                pure=False,
            )
            return _Pending(future, chunk.index), len(call_blob) + len(items_blob)

        try:
            yield from _futures.stream_chunks(
                submit,
                chunks,
                ctx,
                max_in_flight=threads * IN_FLIGHT_PER_THREAD,
                recover=lambda chunk, lost: self._recover(
                    fn, chunk, extra_args, lost, ctx
                ),
                stop_in_flight=lambda submitted, exc: self._stop_in_flight(
                    client, submitted, call_key, ctx, exc
                ),
            )
        finally:
            if call_arg is not call_blob:
                call_arg.release()

    def _recover(
        self,
        fn: Callable[..., Any],
        chunk: Chunk,
        extra_args: tuple[Any, ...],
        lost: _futures.Lost,
        ctx: RunContext,
    ) -> list[Any]:
        """A chunk's worker died: raise ``WorkerCrashedError`` or run it here."""
        # No worker_restarts: the nanny, not we, replaces the worker.
        crash = _futures.Crash(
            what=(
                f"the dask worker running chunk {chunk.index} (items {chunk.start}.."
                f"{chunk.start + len(chunk) - 1}) died ({lost.error})"
            ),
            status=(
                "Only the chunks that worker held are lost and the executor "
                "stays usable."
            ),
            cause=lost.error,
        )
        return _futures.rerun_or_raise(self, fn, chunk, extra_args, ctx, crash)

    def _stop_in_flight(
        self,
        client: distributed.Client,
        submitted: Iterable[_Pending],
        call_key: str,
        ctx: RunContext,
        exc: BaseException,
    ) -> None:
        """Stop this run's chunks: cancel, tell workers, then restart stuck ones."""
        # Not pending.done(): the window may have cancelled them already, and a
        # cancelled future is done while its task may still run on a worker.
        running = [p for p in submitted if p.future.status not in ("finished", "error")]
        if not running:
            return
        for pending in running:
            pending.cancel()
        with contextlib.suppress(Exception):
            # Workers stop the run's chunks at their next item.
            client.run(_mark_cancelled, call_key, on_error="ignore")
        if not self.owns_cluster:
            # Not our workers to restart: a chunk stuck inside one fn call keeps
            # its worker thread until fn returns (docs/scaling-out.md).
            return
        # Ctrl-C must propagate within 1 s (FAULTS.md #8): no grace period.
        grace_s = (
            ctx.cancel_grace_s if isinstance(exc, Exception | GeneratorExit) else 0.0
        )
        deadline = time.monotonic() + grace_s
        while True:
            try:
                busy = client.run(_executing_keys, call_key, on_error="ignore")
            except Exception:
                return
            stuck = [address for address, keys in busy.items() if keys]
            if not stuck:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        self._kill_workers(client, stuck)
        ctx.recorder.add(worker_restarts=len(stuck))

    def _kill_workers(self, client: distributed.Client, addresses: list[str]) -> None:
        """SIGKILL our own cluster's workers; their nannies start fresh ones."""
        # Not client.restart_workers: its graceful close waits for the stuck
        # thread (measured 6 s for a 5 s sleep); a kill is what FAULTS.md #9 asks.
        with contextlib.suppress(Exception):
            pids = client.run(os.getpid, workers=addresses, on_error="ignore")
            for pid in pids.values():
                if isinstance(pid, int):
                    with contextlib.suppress(OSError):
                        os.kill(pid, _KILL_SIGNAL)
        # Wait until the scheduler has removed them, or it may hand the next
        # run's chunks to a dying worker (KilledWorker at once, allowed-failures=0).
        deadline = time.monotonic() + WORKER_REMOVAL_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if not set(addresses) & set(client.nthreads()):
                    break
            except Exception:
                break
            time.sleep(0.02)
        # The killed workers held replicas of the scattered data; when every
        # holder is gone the data is lost, so scatter afresh on the next run.
        with self._lock:
            self._scattered.clear()
            self._pinned.clear()
