"""The dispatcher's connections: worker bookkeeping, crash handling, progress board.

::

    Endpoint ── accept ──▶ pending channel ── HELLO(pid) ──────────▶ WorkerConn
                                           ── SUPERVISOR_HELLO ──▶ control channel
    worker EOF ──▶ _lose ─┐
    ("died", pid, code) ──┴▶ _bury: the chunk it ran (the board says which
                             chunk of a pack) is CRASHED, the rest LOST or
                             requeued; its board slot is freed

``Connections`` is the half of ``engine.strategies._dispatch.Dispatcher``
that owns sockets and worker processes; ``Dispatcher`` (the subclass) owns
the runs, the step and shutdown, and sets every attribute annotated below
in its ``__init__``. Only the step calls these methods (one thread at a
time, ``Dispatcher._io``), so they take no lock.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import os
import secrets
import selectors
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any, Final

from engine._wire import (
    BOARD_SLOT,
    CONTROL,
    EXIT,
    HELLO,
    RESULT_PACK,
    SLOT,
    SUPERVISOR_HELLO,
)
from engine.errors import BrokenExecutorError, SupervisorLostError
from engine.strategies._runs import (
    KINDS_BY_FRAME,
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
)

_RESULT: Final = OutcomeKind.RESULT

# A worker's EOF comes first; the supervisor's ("died", pid, code) follows
# within milliseconds. Without it after this long, settle with what is known.
EXIT_INFO_WAIT_S: Final = 0.5
# Workers dying before they connect, in a row: at start-up the environment
# cannot run them (FAULTS.md #21); later the pool is broken.
START_FAILURES_AT_START: Final = 2
START_FAILURES_LATER: Final = 3
SHORT_TICK_S: Final = 0.05


# -- workers as the step sees them ------------------------------------------------------------


class WorkerState(enum.Enum):
    """A worker connection as the step sees it."""

    READY = "ready"
    RETIRING = "retiring"  # worker_max_tasks reached: no new chunks, then EXIT
    LOST = "lost"  # EOF seen, waiting for its exit code


class WorkerConn:
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


def create_board(slots: int) -> shared_memory.SharedMemory | None:
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


class Connections:
    """Sockets, worker connections and their deaths (the step's bookkeeping)."""

    # Set by Dispatcher.__init__.
    workers: int
    start_method: str
    lifecycle: PoolLifecycle
    _ready: threading.Event
    _start_problem: str
    _runs: dict[int, Run]
    _active: list[Run]
    _pool: list[WorkerConn]
    _by_pid: dict[int, WorkerConn]
    _lost: list[WorkerConn]
    _dirty: list[WorkerConn]
    _pending_channels: list[Channel]
    _start_failures: int
    _supervisor: Channel | None
    _shutdown_deadline: float | None
    _next_process_poll: float
    _done: bool
    _wake_lock: threading.Lock
    _wake_pending: bool
    _board: shared_memory.SharedMemory | None
    _free_slots: list[int]
    _selector: selectors.BaseSelector
    _endpoint: Endpoint
    _wake_r: Any
    _wake_w: Any
    _process: SupervisorProcess | None
    # Defined by Dispatcher (the runs): drop a stopped run once it is idle.
    _finish_if_idle: Callable[[Run], None]

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

    # -- the step's selector -------------------------------------------------------------

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
        worker = WorkerConn(channel, pid)
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

    def _on_worker(self, worker: WorkerConn, mask: int) -> None:
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

    def _on_frames(self, worker: WorkerConn) -> None:
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

    def _running_chunk(self, worker: WorkerConn) -> tuple[int, int] | None:
        """Return (run id, chunk) the dead worker noted on the board, if any."""
        board = self._board
        if worker.slot is None or board is None:
            return None
        return BOARD_SLOT.unpack_from(board.buf, worker.slot * BOARD_SLOT.size)

    def _settle_running(
        self,
        worker: WorkerConn,
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

    def _lose(self, worker: WorkerConn) -> None:
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

    def _bury(self, worker: WorkerConn) -> None:
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

    # -- breaking -------------------------------------------------------------------------

    def _break(self, error_type: type[BrokenExecutorError], reason: str) -> None:
        self.lifecycle.move(PoolState.BROKEN, reason=reason, error_type=error_type)
        outcome = Outcome(OutcomeKind.FAILED, error_type=error_type, reason=reason)
        for run in list(self._runs.values()):
            run.fail(outcome)
        self._ready.set()
