"""The processes strategy's dispatcher: every socket, worker and run of a pool.

::

    map thread (processes.py)              the step (dispatcher, one at a time)
      Run.enqueue(encoded chunks)  ──▶ outbox ──▶ worker with room: FUNC once
      take(run, k): drive the step            per run, then TASK; a worker
        itself while it is the only           holds up to `depth` chunks
        map (leader), else wait on            RESULT / ERROR / CANCELLED
        the Run (follower)           ◀── deliver ◀┘ from the worker's socket
      Run.stop() ─────────────────────▶ CANCEL to holders; after cancel_grace_s
                                        ("kill", pid) to the supervisor
    "engine-processes-N" thread: runs    EOF + ("died", pid, code): CRASHED for
      the step when no map thread         the chunk it ran; its queued chunks
      does (idle pool, slow consumer,     go back to the outbox
      concurrent maps, shutdown)

Why the map thread drives: with tiny chunks (W4, ci/bench/dispatch.py) a
second thread doing the I/O costs two GIL hand-overs per chunk, each a
scheduler wake-up on a busy machine; the leader does recv, bookkeeping and
send in one thread. Only one thread runs the step at a time (``_io``), so
the bookkeeping needs no further lock; map threads otherwise reach it only
through ``Run`` (its own condition) and the request queue.

This module drives: the step, the runs, the pump and shutdown. Sockets,
worker connections, crash handling and the progress board are the base
class ``Connections`` in ``engine.strategies._conns``.

The background thread wraps its loop in ``except BaseException`` (STYLE.md
rule 3): if the step ever fails, the pool is marked broken, every waiting
map fails with ``BrokenExecutorError`` and the supervisor is killed (its
workers die with it) instead of anything hanging.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import selectors
import socket
import threading
import time
from multiprocessing import shared_memory
from typing import Any, Final

from engine._wire import (
    CANCEL,
    EXIT,
    FUNC,
    PACK,
    RELEASE,
    TASK,
)
from engine.errors import (
    BrokenExecutorError,
    StrategyUnavailableError,
)
from engine.strategies._conns import (
    SHORT_TICK_S,
    Connections,
    WorkerConn,
    WorkerState,
    create_board,
)
from engine.strategies._runs import (
    MIN_DEPTH,
    Outcome,
    OutcomeKind,
    Outgoing,
    Run,
    RunState,
)
from engine.strategies.base import DeferInterrupt
from engine.supervisor import (
    Channel,
    Endpoint,
    PoolLifecycle,
    PoolState,
    SupervisorProcess,
    supervisor_spec,
)
from engine.telemetry import RunRecorder

logger = logging.getLogger("engine")

SHUTDOWN_WAIT_S: Final = 3.0
IDLE_TICK_S: Final = 0.5
# After a map thread stops driving (to hand results to its consumer), the
# background thread waits this long before it takes over: a list() consumer
# is back within microseconds, and taking over would cost a hand-over.
LEADER_GRACE_S: Final = 0.005


class Dispatcher(Connections):
    """A process pool seen from the caller: supervisor, workers and runs."""

    _ids = itertools.count(1)

    def __init__(
        self,
        *,
        workers: int,
        start_method: str,
        environment: dict[str, str],
        worker_max_tasks: int | None,
    ) -> None:
        self.workers = workers
        self.start_method = start_method
        self._environment = environment
        self._max_tasks = worker_max_tasks
        self.lifecycle = PoolLifecycle()
        self._ready = threading.Event()
        self._start_problem = ""
        self._requests: collections.deque[tuple[str, Any]] = collections.deque()
        self._run_ids = itertools.count(1)
        self._runs: dict[int, Run] = {}
        self._active: list[Run] = []
        self._pool: list[WorkerConn] = []
        self._by_pid: dict[int, WorkerConn] = {}
        self._lost: list[WorkerConn] = []
        self._dirty: list[WorkerConn] = []
        self._pending_channels: list[Channel] = []
        self._start_failures = 0
        self._supervisor: Channel | None = None
        self._shutdown_deadline: float | None = None
        self._next_process_poll = 0.0
        self._done = False
        # Who runs the step: _io is held while it runs; a map thread that
        # drives counts itself in _leading, and the background thread parks
        # on _turn meanwhile. wake() writes a byte only while the step sleeps.
        self._io = threading.Lock()
        self._turn = threading.Condition(threading.Lock())
        self._leading = 0
        self._last_lead = 0.0
        self._wake_lock = threading.Lock()
        self._sleeping = False
        self._wake_pending = False
        # The progress board: one slot per worker connection, written by the
        # worker before each chunk, read here when it dies (packs: which
        # chunk crashed). A segment like any payload: unlinked at shutdown,
        # and by the supervisor if the caller dies (FAULTS.md #7).
        slots = max(16, 4 * workers + 8)
        self._board: shared_memory.SharedMemory | None = create_board(slots)
        self._free_slots = list(range(slots - 1, -1, -1))
        self._selector = selectors.DefaultSelector()
        self._endpoint = Endpoint()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._endpoint, selectors.EVENT_READ, self._on_accept)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._process: SupervisorProcess | None = None
        self._thread = threading.Thread(
            target=self._main, name=f"engine-processes-{next(self._ids)}", daemon=True
        )

    # -- any thread -----------------------------------------------------------------------

    def start(self, timeout_s: float) -> None:
        """Launch the supervisor; wait until every worker said hello.

        Raises
        ------
        StrategyUnavailableError
            The supervisor or the workers could not start; names the cause.
        """
        spec = supervisor_spec(
            self._endpoint,
            workers=self.workers,
            start_method=self.start_method,
            environment=self._environment,
        )
        if self._board is not None:
            spec["segments"] = [self._board.name]
        try:
            self._process = SupervisorProcess(spec)
        except OSError as exc:
            self._close_sockets()
            msg = f"the supervisor process could not be launched: {exc}"
            raise StrategyUnavailableError(msg) from exc
        self._thread.start()
        if self._ready.wait(timeout_s) and self.lifecycle.state is PoolState.READY:
            return
        problem = self._start_problem or (
            f"the {self.workers} workers did not all connect within {timeout_s:.0f} s"
        )
        self.shutdown()
        raise StrategyUnavailableError(problem)

    def open_run(self, fn_blob: bytes, recorder: RunRecorder, grace_s: float) -> Run:
        run = Run(next(self._run_ids) & 0xFFFFFFFF, fn_blob, recorder, grace_s)
        self._request("open", run)
        return run

    def stop_run(self, run: Run, reason: str) -> None:
        if run.stop(reason):
            self._request("stop", run)
            # The map thread settles its own stop (cancels, releases) when it
            # may drive: the background thread then has nothing to take over
            # for, and does not wake into the caller's next work (see
            # _park_while_led). A failing step has marked the pool broken;
            # the run's own outcome, or error, stands.
            with contextlib.suppress(BrokenExecutorError):
                self._poll_step()

    def register_segments(self, names: list[str]) -> None:
        self._request("segments", names, nudge=True)

    def cancel_all(self, reason: str) -> None:
        self._request("cancel_all", reason, nudge=True)

    def wake(self) -> None:
        """Make the step look at requests and outboxes now."""
        with self._wake_lock:
            # An awake step reads them before it sleeps again (_step): no
            # system call then, which would hand the GIL over.
            if not self._sleeping or self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _request(self, action: str, argument: Any, *, nudge: bool = False) -> None:
        """Queue a request for the step; ``nudge``: also unpark the background
        thread (requests that may come while no map drives the pool)."""
        self._requests.append((action, argument))
        self.wake()
        if nudge:
            with self._turn:
                self._turn.notify_all()

    def failure(self) -> tuple[type[BrokenExecutorError], str] | None:
        """Return why the pool cannot run maps, or None if it can."""
        return self.lifecycle.failure()

    def take(self, run: Run, index: int, timeout_s: float) -> list[tuple[int, Outcome]]:
        """Wait up to ``timeout_s`` for ``run``'s chunk ``index`` (map thread).

        The only active map drives the step itself (leader); with several
        maps, or while another thread drives, it waits on its run.
        """
        ready = run.take_ready(index)
        if ready:
            # Results wait; still give the workers their next chunks first,
            # or they run dry while the map thread decodes and yields.
            self._poll_step()
            return ready
        if self._done:
            return ready
        # Several maps at once: one thread driving for all would make each
        # wait on the others' chunks; the background thread serves them all.
        if len(self._active) > 1 or self._thread.ident is None:
            return run.take(index, timeout_s)
        with self._turn:
            self._leading += 1  # the background thread parks from now on
        try:
            if not self._io.acquire(blocking=False):
                # It holds the step, perhaps asleep in select for up to
                # IDLE_TICK_S: wake it so it hands over after this step.
                self.wake()
                if not self._io.acquire(timeout=timeout_s):
                    return run.take(index, 0)
            try:
                return self._lead(run, index, timeout_s)
            finally:
                self._io.release()
        finally:
            with self._turn:
                self._leading -= 1
                self._last_lead = time.monotonic()
                if run.in_flight or run.head_count():
                    # Work is out (a slow consumer): the background thread
                    # takes over after LEADER_GRACE_S. With none, it stays
                    # parked: waking it costs the caller's next work a GIL
                    # hand-over 5 ms later (ci/bench/quiet.py).
                    self._turn.notify_all()

    def push(self) -> None:
        """Send what is queued now, from this thread if no other drives.

        A map that starts eagerly (``STARTS_EAGERLY``) calls this after
        queueing its first chunks: between maps no thread may be in the step
        (the background thread stays parked for IDLE_TICK_S after a map), so
        waking one is not enough.
        """
        self.wake()
        self._poll_step()

    def _poll_step(self) -> None:
        """Run one step without waiting, if this thread may drive now."""
        if len(self._active) > 1 or self._done or not self._io.acquire(blocking=False):
            return
        try:
            with DeferInterrupt():
                try:
                    self._step(0.0)
                except BaseException as exc:
                    self._crash(exc)
                    msg = f"the process pool's dispatcher failed ({exc!r}); create a new executor"
                    raise BrokenExecutorError(msg) from exc
        finally:
            self._io.release()
            self._last_lead = time.monotonic()  # keep the background thread parked

    def _lead(
        self, run: Run, index: int, timeout_s: float
    ) -> list[tuple[int, Outcome]]:
        deadline = time.monotonic() + timeout_s
        with DeferInterrupt() as interrupt:
            try:
                while True:
                    self._step(min(SHORT_TICK_S, max(0.0, deadline - time.monotonic())))
                    ready = run.take_ready(index)
                    if ready or self._done or interrupt.caught:
                        return ready
                    if time.monotonic() >= deadline:
                        return ready
            except BaseException as exc:
                self._crash(exc)
                msg = f"the process pool's dispatcher failed ({exc!r}); create a new executor"
                raise BrokenExecutorError(msg) from exc

    def shutdown(self) -> None:
        """Stop everything; return within a few seconds whatever happens."""
        if self._thread.is_alive():
            self._request("shutdown", None)
            with self._turn:
                self._turn.notify_all()
            self._thread.join(SHUTDOWN_WAIT_S + 2.0)
        process = self._process
        if (
            process is not None
            and process.wait(0 if self._thread.is_alive() else 1.0) is None
        ):
            process.kill()  # last resort: its workers die with it (PDEATHSIG, EOF)
            process.wait(2.0)
        self._close_sockets()
        self.lifecycle.move(PoolState.CLOSING)
        self.lifecycle.move(PoolState.CLOSED)
        self._ready.set()

    def forget_in_child(self) -> None:
        """In a forked child of the caller: close our copies of the sockets.

        An inherited copy would keep a dead caller's connections open
        (SUPERVISOR-NOTES.md pitfall 6). No locks: a parent thread may hold
        them. The pool itself belongs to the parent.
        """
        self._close_sockets(unlink=False)
        if self._process is not None:
            self._process.forget()

    # -- the background thread --------------------------------------------------------------

    def _main(self) -> None:
        try:
            while not self._done:
                self._park_while_led()
                with self._io:
                    if not self._done:
                        self._step(IDLE_TICK_S)
        except BaseException as exc:
            self._crash(exc)
        finally:
            self._ready.set()

    def _park_while_led(self) -> None:
        # The background thread must not take the step while a map thread
        # drives it, nor right after (LEADER_GRACE_S): the map thread is
        # usually back within microseconds, and a hand-over costs a wake-up.
        # With no run open, nothing needs driving soon: it takes over only
        # after IDLE_TICK_S (a dead idle worker is noticed then, or by the
        # next map's own step). A shutdown is driven without a break: parked
        # here, it waited out the gap, and an executor shut down right after
        # a map took 0.5 s to close instead of ~2 ms.
        with self._turn:
            while not self._done:
                if self._leading:
                    self._turn.wait(IDLE_TICK_S)
                    continue
                grace = LEADER_GRACE_S if self._runs else IDLE_TICK_S
                gap = grace - (time.monotonic() - self._last_lead)
                if gap <= 0 or self._requests or self._shutdown_deadline is not None:
                    return
                self._turn.wait(gap)

    def _crash(self, exc: BaseException) -> None:
        # Never die silently: every map waiting on this pool fails now, and
        # the supervisor is killed (its workers die with it).
        logger.error("engine: the process pool's dispatcher failed", exc_info=exc)
        reason = (
            f"the process pool's dispatcher failed ({exc!r}); create a new executor"
        )
        if self.lifecycle.state is PoolState.STARTING:
            self._start_problem = reason  # start() reports it at once
        self._break(BrokenExecutorError, reason)
        self._done = True
        if self._process is not None:
            self._process.kill()

    # -- the step -------------------------------------------------------------------------------

    def _step(self, cap_s: float) -> None:
        """Wait for events (at most ``cap_s``), handle them, dispatch, write."""
        # The order matters: events may free workers and deliver outcomes,
        # requests may open or stop runs, then _pump fills the room, one
        # write per channel (_flush), and _tick checks the deadlines.
        timeout = min(cap_s, self._timeout())
        if timeout > 0:
            with self._wake_lock:
                self._sleeping = True
            if self._requests or self._can_dispatch():
                timeout = 0.0  # work arrived while wake() saw us awake
        try:
            events = self._selector.select(timeout)
        finally:
            with self._wake_lock:
                self._sleeping = False
        for key, mask in events:
            key.data(mask)
        while self._requests:
            action, argument = self._requests.popleft()
            getattr(self, f"_do_{action}")(argument)
        self._pump()
        self._flush()
        self._tick()

    def _timeout(self) -> float:
        if (
            self.lifecycle.state is PoolState.STARTING
            or self._shutdown_deadline is not None
        ):
            return SHORT_TICK_S
        timeout = IDLE_TICK_S
        if self._lost or self._pending_channels:
            timeout = SHORT_TICK_S
        now = time.monotonic()
        for run in self._runs.values():
            if run.kill_deadline is not None:
                timeout = min(timeout, run.kill_deadline - now)
        return max(0.0, timeout)

    def _depth(self) -> int:
        return max((run.depth for run in self._active), default=MIN_DEPTH)

    def _can_dispatch(self) -> bool:
        """Whether _pump would send something now (else the step may sleep)."""
        depth = self._depth()
        for run in self._active:
            count = run.head_count()
            if count and any(self._fits(w, count, depth) for w in self._pool):
                return True
        return False

    def _fits(self, worker: WorkerConn, count: int, depth: int) -> bool:
        # As _pump decides: room for it (an idle worker takes any pack), and
        # within what is left of the worker's worker_max_tasks.
        if worker.state is not WorkerState.READY:
            return False
        if worker.held and worker.held + count > depth:
            return False
        return self._max_tasks is None or worker.chunks_sent + count <= self._max_tasks

    # -- runs ---------------------------------------------------------------------------------

    def _do_open(self, run: Run) -> None:
        failure = self.failure()
        if failure is not None:
            run.fail(
                Outcome(OutcomeKind.FAILED, error_type=failure[0], reason=failure[1])
            )
            return
        self._runs[run.run_id] = run
        self._active.append(run)

    def _do_stop(self, run: Run) -> None:
        # Cooperative first (FAULTS.md #9): workers holding the run's chunks
        # see CANCEL between items; whoever still runs one after the grace
        # period is killed by _tick. Queued chunks are answered CANCELLED.
        if run in self._active:
            self._active.remove(run)
        for worker in self._pool:
            if any(held is run for held, _, _ in worker.in_flight):
                worker.channel.queue(CANCEL, run.run_id, 0, 0)
                self._dirty.append(worker)
        run.kill_deadline = time.monotonic() + run.grace_s
        self._finish_if_idle(run)

    def _do_cancel_all(self, reason: str) -> None:
        for run in list(self._active):
            if run.stop(reason):
                self._do_stop(run)

    def _do_segments(self, names: list[str]) -> None:
        self._control("segments", names)

    def _finish_if_idle(self, run: Run) -> None:
        # A stopped run lives until its last chunk is settled, so a late
        # reply is matched and dropped; then workers drop its function.
        if run.in_flight > 0 or run.state is not RunState.STOPPING or not run.finish():
            return
        self._runs.pop(run.run_id, None)
        for worker in self._pool:
            if run.run_id in worker.functions:
                worker.functions.discard(run.run_id)
                worker.channel.queue(RELEASE, run.run_id, 0, 0)
                self._dirty.append(worker)

    def _pump(self) -> None:
        """Give queued chunks to workers with room, the least loaded first."""
        active = self._active
        if not active or self.lifecycle.state is not PoolState.READY:
            return
        depth = self._depth()
        now = time.monotonic()
        ready = [w for w in self._pool if w.state is WorkerState.READY]
        ready.sort(key=lambda w: w.held)
        # The least loaded first, one chunk each, then each worker's room in
        # one lock round. Dealing the first chunks round-robin matters when
        # there are few long ones: an ordered map consumes chunk 1 before
        # chunk 2, and chunks 0 and 1 on one worker made the caller wait for
        # both while the other worker's results sat finished (W1 via the CE
        # plugin: chunk 2 done at 111 ms, consumed at 179 ms).
        for worker, share in [(w, 1) for w in ready] + [(w, depth) for w in ready]:
            if worker.state is not WorkerState.READY:  # retired in the first pass
                continue
            room = min(share, depth - worker.held)
            for run in active:
                if room <= 0:
                    break
                budget = None
                if self._max_tasks is not None:
                    budget = self._max_tasks - worker.chunks_sent
                items = run.pop_outgoing(room, may_exceed=worker.held == 0, cap=budget)
                if not items and budget is not None and worker.held == 0:
                    count = run.head_count()
                    if count > budget:
                        # The next pack does not fit what is left of its
                        # worker_max_tasks: recycle it now, a fresh worker
                        # takes the pack (else nobody ever would).
                        worker.state = WorkerState.RETIRING
                        worker.channel.queue(EXIT, 0, 0, 0)
                        self._dirty.append(worker)
                        break
                for position, item in enumerate(items):
                    self._send_task(worker, run, item, now)
                    room -= item.count
                    if worker.state is not WorkerState.READY:  # worker_max_tasks
                        for rest in reversed(items[position + 1 :]):
                            run.requeue(rest)
                        room = 0
                        break

    def _send_task(
        self, worker: WorkerConn, run: Run, item: Outgoing, now: float
    ) -> None:
        channel = worker.channel
        if run.run_id not in worker.functions:
            # The function travels once per worker per map, not per chunk.
            worker.functions.add(run.run_id)
            channel.queue(FUNC, run.run_id, 0, 0, run.fn_blob)
            run.recorder.add(bytes_pickled=len(run.fn_blob))
        kind = TASK if item.count == 1 else PACK
        channel.queue(kind, run.run_id, item.index, item.start, item.payload)
        worker.in_flight.append((run, item, now - item.enqueued_at))
        run.in_flight += 1
        worker.held += item.count
        worker.chunks_sent += item.count
        if self._max_tasks is not None and worker.chunks_sent >= self._max_tasks:
            worker.state = WorkerState.RETIRING  # recycled once this chunk is done
        if not self._dirty or self._dirty[-1] is not worker:
            self._dirty.append(worker)

    # -- closing --------------------------------------------------------------------

    def _do_shutdown(self, _: Any) -> None:
        # Bounded in time whatever the workers do (FAULTS.md #8, #18): the
        # caller is leaving, maybe on Ctrl-C or at interpreter exit.
        self.lifecycle.move(PoolState.CLOSING)
        self._shutdown_deadline = time.monotonic() + SHUTDOWN_WAIT_S
        outcome = Outcome(
            OutcomeKind.FAILED,
            error_type=BrokenExecutorError,
            reason="the executor was shut down during the run",
        )
        for run in list(self._runs.values()):
            run.fail(outcome)
        # First stop the replacing, then kill the busy (nothing they compute
        # can be used any more) and close the idle: they exit on EOF at once.
        self._control("shutdown")
        for worker in self._pool:
            if worker.in_flight:
                self._control("kill", worker.pid)
            self._unwatch(worker.channel)
            worker.channel.close()
        if self._supervisor is None:
            self._done = True
