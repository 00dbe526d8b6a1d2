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

The background thread wraps its loop in ``except BaseException`` (STYLE.md
rule 3): if the step ever fails, the pool is marked broken, every waiting
map fails with ``BrokenExecutorError`` and the supervisor is killed (its
workers die with it) instead of anything hanging.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import logging
import os
import secrets
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any, Final

from engine._worker import (
    BOARD_SLOT,
    CANCEL,
    CONTROL,
    EXIT,
    FUNC,
    HELLO,
    PACK,
    RELEASE,
    RESULT_PACK,
    SLOT,
    SUPERVISOR_HELLO,
    TASK,
)
from engine.errors import (
    BrokenExecutorError,
    StrategyUnavailableError,
    SupervisorLostError,
)
from engine.strategies._runs import (
    KINDS_BY_FRAME,
    MIN_DEPTH,
    Outcome,
    OutcomeKind,
    Outgoing,
    Run,
    RunState,
)
from engine.supervisor import (
    Channel,
    Endpoint,
    PoolLifecycle,
    PoolState,
    SupervisorProcess,
    decode_control,
    encode_control,
    supervisor_spec,
)
from engine.telemetry import RunRecorder

logger = logging.getLogger("engine")
_RESULT: Final = OutcomeKind.RESULT

# A worker's EOF comes first; the supervisor's ("died", pid, code) follows
# within milliseconds. Without it after this long, settle with what is known.
EXIT_INFO_WAIT_S: Final = 0.5
# Workers dying before they connect, in a row: at start-up the environment
# cannot run them (FAULTS.md #21); later the pool is broken.
START_FAILURES_AT_START: Final = 2
START_FAILURES_LATER: Final = 3
SHUTDOWN_WAIT_S: Final = 3.0
IDLE_TICK_S: Final = 0.5
SHORT_TICK_S: Final = 0.05
# After a map thread stops driving (to hand results to its consumer), the
# background thread waits this long before it takes over: a list() consumer
# is back within microseconds, and taking over would cost a hand-over.
LEADER_GRACE_S: Final = 0.005


# -- workers as the step sees them ------------------------------------------------------------


class WorkerState(enum.Enum):
    """A worker connection as the step sees it."""

    READY = "ready"
    RETIRING = "retiring"  # worker_max_tasks reached: no new chunks, then EXIT
    LOST = "lost"  # EOF seen, waiting for its exit code


class _Worker:
    """One worker connection (touched by the step only)."""

    __slots__ = (
        "channel",
        "chunks_sent",
        "exitcode",
        "functions",
        "handler",
        "held",
        "in_flight",
        "killing",
        "lost_at",
        "pid",
        "slot",
        "state",
    )

    def __init__(self, channel: Channel, pid: int) -> None:
        self.channel = channel
        self.pid = pid
        self.state = WorkerState.READY
        # (run, chunk, dispatch wait); a worker runs its chunks in order, so
        # the first entry is the one running.
        self.in_flight: collections.deque[tuple[Run, Outgoing, float]] = (
            collections.deque()
        )
        self.functions: set[int] = set()
        self.chunks_sent = 0
        self.killing = False
        self.lost_at: float | None = None
        self.exitcode: int | bool | None = False  # False: not reported yet
        self.handler: Callable[[int], None] = _ignore
        self.held = 0  # chunks in flight (a pack counts its chunks)
        self.slot: int | None = None  # its slot on the progress board


def _create_board(slots: int) -> shared_memory.SharedMemory | None:
    """Create the progress board, named like every segment of this process."""
    name = f"cepe_{_base36(os.getpid())}_{secrets.token_hex(6)}"
    try:
        return shared_memory.SharedMemory(
            name=name, create=True, size=slots * BOARD_SLOT.size
        )
    except OSError:
        return None  # no board: a crash in a pack is pinned on its first chunk


def _base36(number: int) -> str:
    """``number`` in base 36 (the pid part of segment names, as payload.py)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return out


def _ignore(mask: int) -> None:
    """Selector callback placeholder."""


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


class _DeferInterrupt:
    """While the main thread runs the step, Ctrl-C waits until it is over.

    A KeyboardInterrupt between two lines of bookkeeping would leave it
    half-updated (a chunk popped, never settled; a frame half-written). The
    swap is made only for Python's default handler, in the main thread;
    the waiting in ``select`` is capped, so the interrupt still surfaces
    within SHORT_TICK_S (FAULTS.md #8: under 1 s).
    """

    def __init__(self) -> None:
        self.caught = False
        self._previous: Any = None

    def __enter__(self) -> _DeferInterrupt:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum: int, frame: object) -> None:
        self.caught = True

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.caught and exc_info[0] is None:
            raise KeyboardInterrupt


class Dispatcher:
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
        self._pool: list[_Worker] = []
        self._by_pid: dict[int, _Worker] = {}
        self._lost: list[_Worker] = []
        self._dirty: list[_Worker] = []
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
        self._board: shared_memory.SharedMemory | None = _create_board(slots)
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

    def register_segments(self, names: list[str]) -> None:
        self._request("segments", names)

    def cancel_all(self, reason: str) -> None:
        self._request("cancel_all", reason)

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

    def _request(self, action: str, argument: Any) -> None:
        self._requests.append((action, argument))
        self.wake()

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
                self._turn.notify_all()

    def _poll_step(self) -> None:
        """Run one step without waiting, if this thread may drive now."""
        if len(self._active) != 1 or self._done or not self._io.acquire(blocking=False):
            return
        try:
            with _DeferInterrupt():
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
        with _DeferInterrupt() as interrupt:
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

    def _close_sockets(self, *, unlink: bool = True) -> None:
        board, self._board = self._board, None
        if board is not None:
            with contextlib.suppress(OSError, BufferError):
                board.close()
            if unlink:  # only the creating process unlinks (SHM-NOTES.md)
                with contextlib.suppress(OSError):
                    board.unlink()
        for channel in [
            w.channel for w in self._pool + self._lost
        ] + self._pending_channels:
            channel.close()
        if self._supervisor is not None:
            self._supervisor.close()
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        self._endpoint.close()
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            self._selector.close()

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
        with self._turn:
            while not self._done:
                if self._leading:
                    self._turn.wait(IDLE_TICK_S)
                    continue
                gap = LEADER_GRACE_S - (time.monotonic() - self._last_lead)
                if gap <= 0 or self._requests:
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

    def _fits(self, worker: _Worker, count: int, depth: int) -> bool:
        # As _pump decides: room for it (an idle worker takes any pack), and
        # within what is left of the worker's worker_max_tasks.
        if worker.state is not WorkerState.READY:
            return False
        if worker.held and worker.held + count > depth:
            return False
        return self._max_tasks is None or worker.chunks_sent + count <= self._max_tasks

    def _watch(self, channel: Channel, handler: Callable[[int], None]) -> None:
        self._selector.register(channel, selectors.EVENT_READ, handler)

    def _unwatch(self, channel: Channel) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(channel)

    def _want_write(self, channel: Channel, handler: Callable[[int], None]) -> None:
        events = selectors.EVENT_READ | (
            selectors.EVENT_WRITE if channel.wants_write else 0
        )
        with contextlib.suppress(KeyError, ValueError, OSError):
            if self._selector.get_key(channel).events != events:
                self._selector.modify(channel, events, handler)

    def _flush(self) -> None:
        """Write what this step queued: one system call per busy channel."""
        dirty, self._dirty = self._dirty, []
        for worker in dict.fromkeys(dirty):
            channel = worker.channel
            if channel.is_open:
                channel.flush()
                if channel.wants_write:
                    self._want_write(channel, worker.handler)

    # -- connections -------------------------------------------------------------------------

    def _on_wake(self, mask: int) -> None:
        # Drain first, then clear the flag: a wake() that found it set wrote
        # its request before, and this step reads requests after us.
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        with self._wake_lock:
            self._wake_pending = False

    def _on_accept(self, mask: int) -> None:
        while (channel := self._endpoint.accept()) is not None:
            self._pending_channels.append(channel)
            self._watch(channel, lambda m, c=channel: self._on_pending(c, m))

    def _on_pending(self, channel: Channel, mask: int) -> None:
        """A connection that has not said who it is yet."""
        if mask & selectors.EVENT_WRITE:
            channel.flush()
        alive = channel.on_readable() if mask & selectors.EVENT_READ else True
        frames = channel.reader.frames
        if alive and not (channel.is_open and frames):
            return
        self._pending_channels.remove(channel)
        self._unwatch(channel)
        kind, _, _, pid, _, _ = frames.popleft() if alive else (0, 0, 0, 0, None, 0.0)
        if kind == HELLO:
            self._add_worker(channel, pid)
        elif kind == SUPERVISOR_HELLO and self._supervisor is None:
            self._supervisor = channel
            self._watch(channel, self._on_supervisor)
        else:
            channel.close()

    def _add_worker(self, channel: Channel, pid: int) -> None:
        worker = _Worker(channel, pid)
        worker.handler = lambda mask: self._on_worker(worker, mask)
        self._pool.append(worker)
        self._by_pid[pid] = worker
        self._start_failures = 0
        if self._free_slots:
            # Before any chunk: where this worker notes the chunk it runs.
            worker.slot = self._free_slots.pop()
            channel.queue(SLOT, 0, 0, worker.slot, self._board.name.encode())
            self._dirty.append(worker)
        self._watch(channel, worker.handler)
        if (
            self.lifecycle.state is PoolState.STARTING
            and len(self._pool) >= self.workers
        ):
            self.lifecycle.move(PoolState.READY)
            self._ready.set()

    def _on_supervisor(self, mask: int) -> None:
        channel = self._supervisor
        assert channel is not None
        if mask & selectors.EVENT_WRITE:
            channel.flush()
            self._want_write(channel, self._on_supervisor)
        alive = channel.on_readable() if mask & selectors.EVENT_READ else True
        while channel.reader.frames:
            kind, _, _, _, payload, _ = channel.reader.frames.popleft()
            if kind == CONTROL:
                message = decode_control(payload)
                if message[0] == "died":
                    self._on_died(message[1], message[2])
        if not alive:
            self._unwatch(channel)
            channel.close()
            self._supervisor_gone("its control connection closed")

    def _control(self, *message: Any) -> None:
        channel = self._supervisor
        if channel is not None and channel.is_open:
            channel.send(CONTROL, 0, 0, 0, encode_control(*message))
            self._want_write(channel, self._on_supervisor)

    def _supervisor_gone(self, how: str) -> None:
        if self._shutdown_deadline is not None:
            self._done = True  # the shutdown we asked for
            return
        process = self._process
        code = process.poll() if process is not None else None
        detail = f" (exit code {code})" if code is not None else ""
        if self.lifecycle.state is PoolState.STARTING:
            self._start_problem = (
                f"the supervisor process stopped before its workers started: {how}"
                f"{detail}; see its message on stderr"
            )
        reason = (
            f"the supervisor process died{detail}: {how}. Its workers died with it; "
            "create a new executor (it starts a fresh supervisor)"
        )
        self._break(SupervisorLostError, reason)
        self._done = True

    # -- workers ---------------------------------------------------------------------------------

    def _on_worker(self, worker: _Worker, mask: int) -> None:
        channel = worker.channel
        if mask & selectors.EVENT_WRITE:
            channel.flush()
        alive = channel.on_readable() if mask & selectors.EVENT_READ else True
        if channel.reader.frames:
            self._on_frames(worker)
        if not alive or channel.broken:
            self._lose(worker)
        elif mask & selectors.EVENT_WRITE:
            self._want_write(channel, worker.handler)

    def _on_frames(self, worker: _Worker) -> None:
        """Settle the chunks whose replies arrived; one lock round per run."""
        frames = worker.channel.reader.frames
        in_flight = worker.in_flight
        pid = worker.pid
        batch: list[tuple[int, Outcome]] = []
        batch_run: Run | None = None
        while frames and in_flight:
            kind, run_id, index, _, payload, _ = frames.popleft()
            run, item, wait_s = in_flight[0]
            first = item.index
            if run.run_id != run_id or not first <= index < first + item.count:
                continue  # not a reply to what it runs: never seen
            in_flight.popleft()
            run.in_flight -= 1
            worker.held -= item.count
            if run.state is not RunState.ACTIVE:
                self._finish_if_idle(run)
                continue
            if run is not batch_run:
                if batch_run is not None:
                    batch_run.deliver_many(batch)
                batch, batch_run = [], run
            if kind == RESULT_PACK:  # one outcome for the pack: the map thread splits
                outcome = Outcome(
                    _RESULT, payload, pid, None, None, wait_s, None, "", item.count
                )
                batch.append((first, outcome))
                continue
            outcome_kind = KINDS_BY_FRAME.get(kind)
            if outcome_kind is not None:
                outcome = Outcome(outcome_kind, payload, pid, None, None, wait_s)
                batch.append((index, outcome))
        if batch_run is not None:
            batch_run.deliver_many(batch)
        frames.clear()
        if worker.state is WorkerState.RETIRING and not in_flight:
            worker.channel.send(EXIT, 0, 0, 0)  # worker_max_tasks: recycle it

    def _running_chunk(self, worker: _Worker) -> tuple[int, int] | None:
        """Return (run id, chunk) the dead worker noted on the board, if any."""
        board = self._board
        if worker.slot is None or board is None:
            return None
        return BOARD_SLOT.unpack_from(board.buf, worker.slot * BOARD_SLOT.size)

    def _settle_running(
        self,
        worker: _Worker,
        run: Run,
        item: Outgoing,
        wait_s: float,
        exitcode: int | None,
        running: tuple[int, int] | None,
    ) -> None:
        """The chunk (or pack) a dead worker was running when it died."""
        first, last = item.index, item.index + item.count - 1
        crashed = first
        if (
            running is not None
            and running[0] == run.run_id
            and first <= running[1] <= last
        ):
            crashed = running[1]  # the board says which chunk of the pack ran
        outcomes = []
        for index in range(first, last + 1):
            if index == crashed and not worker.killing:
                # The chunk it was running dies with it (FAULTS.md #1, #2).
                kind = OutcomeKind.CRASHED
            else:
                # A pack's other chunks (finished but unsent, or not started):
                # the map thread sends them again, one by one.
                kind = OutcomeKind.LOST
            outcome = Outcome(
                kind,
                pid=worker.pid,
                exitcode=exitcode,
                signal_name=_signal_name(exitcode),
                dispatch_wait_s=wait_s,
            )
            outcomes.append((index, outcome))
        run.deliver_many(outcomes)

    def _lose(self, worker: _Worker) -> None:
        """EOF from a worker: it died, was killed, or retired."""
        # The EOF arrives within milliseconds of a death (one socket per
        # worker, SUPERVISOR-NOTES.md pitfall 3); its chunks are settled once
        # the supervisor reports the exit code, or after EXIT_INFO_WAIT_S.
        if worker.state is WorkerState.LOST:
            return
        self._unwatch(worker.channel)
        worker.channel.close()
        worker.state = WorkerState.LOST
        worker.lost_at = time.monotonic()
        self._pool.remove(worker)
        self._lost.append(worker)
        if worker.exitcode is not False:
            self._bury(worker)

    def _on_died(self, pid: int, exitcode: int | None) -> None:
        worker = self._by_pid.get(pid)
        if worker is None:
            # It never said hello: it could not start (FAULTS.md #21).
            self._start_failed(pid, exitcode)
            return
        worker.exitcode = exitcode
        if worker.state is WorkerState.LOST:
            self._bury(worker)
            return
        # The exit report can overtake the last bytes on the worker's own
        # socket: read them first, so a result sent before death counts and
        # the crash is pinned on the chunk it really ran.
        worker.channel.drain()
        if worker.channel.reader.frames:
            self._on_frames(worker)
        self._lose(worker)

    def _start_failed(self, pid: int, exitcode: int | None) -> None:
        self._start_failures += 1
        how = _signal_name(exitcode) or f"exit code {exitcode}"
        failure = (
            f"worker process {pid} ({self.start_method}) exited before connecting "
            f"({how}); see its traceback on stderr"
        )
        if self.lifecycle.state is PoolState.STARTING:
            if self._start_failures >= START_FAILURES_AT_START:
                self._start_problem = failure
                self._break(BrokenExecutorError, failure)
        elif (
            self._start_failures >= START_FAILURES_LATER
            and self._shutdown_deadline is None
        ):
            reason = f"replacement workers keep dying before they connect: {failure}"
            self._break(BrokenExecutorError, reason + "; create a new executor")

    def _bury(self, worker: _Worker) -> None:
        """Settle the chunks a lost worker held, once its exit code is known."""
        if worker in self._lost:
            self._lost.remove(worker)
        self._by_pid.pop(worker.pid, None)
        exitcode = None if worker.exitcode is False else worker.exitcode
        running = self._running_chunk(worker)
        for position, (run, item, wait_s) in enumerate(worker.in_flight):
            run.in_flight -= 1
            if run.state is not RunState.ACTIVE:
                self._finish_if_idle(run)
            elif position == 0 and (item.count > 1 or not worker.killing):
                self._settle_running(worker, run, item, wait_s, exitcode, running)
            else:
                run.requeue(item)  # not started yet, or innocent of a forced kill
        worker.in_flight.clear()
        worker.held = 0
        if worker.slot is not None:
            self._free_slots.append(worker.slot)
            worker.slot = None
        if self._shutdown_deadline is None:
            for run in self._active:
                run.recorder.add(worker_restarts=1)

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
        # The least loaded first, and each worker's room in one lock round.
        # With depth 2 (chunks that take a while) the last chunks of a map
        # still spread over the workers.
        for worker in ready:
            room = depth - worker.held
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

    def _send_task(self, worker: _Worker, run: Run, item: Outgoing, now: float) -> None:
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

    # -- time-driven checks ------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        for worker in list(self._lost):
            if worker.lost_at is not None and now - worker.lost_at > EXIT_INFO_WAIT_S:
                self._bury(worker)  # no exit report: settle with what we know
        for channel in list(self._pending_channels):
            if now > channel.deadline:  # never finished its handshake
                self._pending_channels.remove(channel)
                self._unwatch(channel)
                channel.close()
        for worker in self._pool:
            if worker.killing or not worker.in_flight:
                continue
            run = worker.in_flight[0][0]
            deadline = run.kill_deadline
            if (
                run.state is not RunState.ACTIVE
                and deadline is not None
                and now >= deadline
            ):
                # FAULTS.md #9: it did not stop at the cooperative check in
                # time (stuck in C, or one long item): kill and replace it.
                worker.killing = True
                self._control("kill", worker.pid)
        process = self._process
        if process is None or now < self._next_process_poll:
            return
        self._next_process_poll = now + SHORT_TICK_S  # waitpid: not on every step
        exited = process.poll() is not None
        if exited and self._supervisor is None:
            self._supervisor_gone("it exited before connecting")
        elif exited and self._shutdown_deadline is None:
            self._supervisor_gone("the process exited")
        if self._shutdown_deadline is not None and (
            exited or now >= self._shutdown_deadline
        ):
            self._done = True

    # -- breaking and closing --------------------------------------------------------------------

    def _break(self, error_type: type[BrokenExecutorError], reason: str) -> None:
        self.lifecycle.move(PoolState.BROKEN, reason=reason, error_type=error_type)
        outcome = Outcome(OutcomeKind.FAILED, error_type=error_type, reason=reason)
        for run in list(self._runs.values()):
            run.fail(outcome)
        self._ready.set()

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
