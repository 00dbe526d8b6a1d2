"""The worker process: connect back to the caller, run chunks, return results.

::

    supervisor (parent)            worker (this module)                 caller
      fork/spawn/forkserver ──▶ worker_main(spec)
                                  PR_SET_PDEATHSIG, SIGINT ignored,
                                  thread caps, warm imports
                                  connect + HMAC handshake ───────────▶ Listener
                                  HELLO(pid) ─────────────────────────▶ dispatcher
                                  loop: ◀── FUNC(run, fn+args blob)      (once per run)
                                        ◀── TASK(run, chunk, items)
                                        run_chunk, checking for CANCEL
                                        every CANCEL_POLL_S between items
                                        RESULT / ERROR / CANCELLED ──▶
                                        ◀── CANCEL / RELEASE / EXIT

The worker talks to the caller only, over its own socket, and to nobody
else: no shared queue whose lock a dying worker could take with it
(SUPERVISOR-NOTES.md pitfall 3). The caller sends a chunk only to a worker
that has room for it, so it always knows which chunk died with a worker.

The wire format both ends share (frames, the handshake, how results and
exceptions travel) lives in ``engine._wire``. This module imports only the
standard library and engine modules that do not import numpy, because the
supervisor imports it and must stay light; ``engine.payload`` (numpy,
cloudpickle) is imported by the worker itself, after its thread caps are set.
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import select
import signal
import socket
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from engine import _env, _state
from engine._chunks import run_chunk
from engine._wire import (
    BOARD_SLOT,
    CANCEL,
    CANCELLED,
    ERROR,
    EXIT,
    FUNC,
    HELLO,
    PACK,
    PLAIN_PACK,
    RELEASE,
    RESULT,
    RESULT_META,
    RESULT_PACK,
    SLOT,
    TASK,
    WHOLE_LIST,
    Frame,
    FrameReader,
    connect,
    encode_results,
    is_plain,
    pack_error,
    read_frame,
    send_frame,
)
from engine.errors import CancelledError

# -- the worker process ------------------------------------------------------------

# How often a running chunk looks for a CANCEL frame (and for a vanished
# parent) between items: cooperative cancel within milliseconds, at a cost
# of one clock read per item (FAULTS.md #9).
CANCEL_POLL_S: Final = 0.005
_PR_SET_PDEATHSIG: Final = 1


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to find its caller; picklable for spawn."""

    family: str
    address: Any
    authkey: bytes
    supervisor_pid: int
    environment: dict[str, str] = field(default_factory=dict)
    close_fds: tuple[int, ...] = ()
    # None under forkserver: the parent is the fork server, not the supervisor.
    parent_pid: int | None = None


def _die_with_parent(spec: WorkerSpec) -> int:
    """Make the worker die with its parent; return the parent pid to watch."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        # SUPERVISOR-NOTES.md pitfall 7: PR_SET_PDEATHSIG belongs on workers
        # (they die 4-40 ms after a supervisor SIGKILL), never on the
        # supervisor, where it fires when the caller *thread* exits.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before prctl took effect: then we were
    # re-parented already and no signal will ever come.
    expected = spec.parent_pid
    if (expected is not None and os.getppid() != expected) or not _alive(
        spec.supervisor_pid
    ):
        os._exit(0)
    return parent


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # Windows: os.kill(pid, 0) would *terminate* the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def worker_main(spec: WorkerSpec) -> None:
    """Run one worker process until the caller closes its connection."""
    _state.mark_worker_process()  # FAULTS.md #11: nested executors run serially
    if hasattr(signal, "SIGINT"):
        # FAULTS.md #8: Ctrl-C reaches the whole process group; the caller
        # turns it into a cancel, so workers must not die of it mid-chunk.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = _die_with_parent(spec)
    # FAULTS.md #13: before numpy is imported (the supervisor never imports
    # it, so a forked worker has not either; spawned ones inherit the caps).
    _env.apply_environment(spec.environment)
    for fd in spec.close_fds:  # the supervisor's control socket, under fork
        with contextlib.suppress(OSError):
            os.close(fd)
    sock = connect(spec.family, spec.address, spec.authkey)
    # Warm imports before saying hello: a worker that says hello is ready, so
    # the first map on a new pool pays no numpy import per chunk.
    import engine.payload  # noqa: F401

    send_frame(sock, HELLO, aux=os.getpid())
    worker = _Worker(sock, parent)
    try:
        worker.serve()
    except (ConnectionError, BrokenPipeError):
        pass  # the caller went away; the supervisor will notice our exit
    finally:
        from engine import payload

        payload.detach_all()
        worker.close_board()
        sock.close()


class _Worker:
    """The loop of one worker. Single-threaded, like the process."""

    def __init__(self, sock: socket.socket, parent_pid: int) -> None:
        self.sock = sock
        self.parent_pid = parent_pid
        self.reader = FrameReader()
        # run id -> (fn, resolved extra args) or the exception loading them
        self.functions: dict[
            int, tuple[Callable[..., Any], tuple[Any, ...]] | BaseException
        ] = {}
        self.cancelled: set[int] = set()
        self.eof = False
        self.board: Any = None  # the progress board (shared memory), once told
        self.slot_offset = 0

    def serve(self) -> None:
        handlers = {
            FUNC: self._load_function,
            TASK: self._run_task,
            PACK: self._run_task,
            SLOT: self._attach_board,
        }
        while True:
            frame = read_frame(self.sock, self.reader)
            if frame is None or frame[0] == EXIT:
                return
            kind, run = frame[0], frame[1]
            if kind in handlers:
                handlers[kind](frame)
            elif kind == CANCEL:
                self.cancelled.add(run)
            elif kind == RELEASE:
                self.functions.pop(run, None)
                self.cancelled.discard(run)
                if not self.functions:
                    # The run's own segments are unlinked by the caller; a
                    # mapping kept here would keep their memory.
                    from engine import payload

                    payload.detach_transient()
            if self.eof:
                return

    def _load_function(self, frame: Frame) -> None:
        from engine import payload

        run = frame[1]
        try:
            fn, extra_args = payload.loads(frame[4])
            self.functions[run] = (fn, payload.resolve(tuple(extra_args)))
        except BaseException as exc:  # reported with each task of the run
            self.functions[run] = exc

    def _attach_board(self, frame: Frame) -> None:
        from multiprocessing import shared_memory

        # Every process here shares the caller's resource tracker (the
        # supervisor adopted its fd), so this attach's registration is a
        # duplicate the tracker ignores; nobody here ever unregisters
        # (SHM-NOTES.md P2). 3.13+: not tracked at all.
        name = bytes(frame[4]).decode()
        if sys.version_info >= (3, 13):
            board = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
        else:
            board = shared_memory.SharedMemory(name=name)
        self.board, self.slot_offset = board, frame[3] * BOARD_SLOT.size

    def close_board(self) -> None:
        board, self.board = self.board, None
        if board is not None:
            with contextlib.suppress(OSError, BufferError):
                board.close()

    def _reply(self, kind: int, frame: Frame, *parts: bytes) -> None:
        send_frame(self.sock, kind, frame[1], frame[2], frame[3], *parts)

    def _run_task(self, frame: Frame) -> None:
        kind, run, first, start, data, received_at = frame
        if run in self.cancelled:
            self._reply(CANCELLED, frame)
            return
        loaded = self.functions.get(run)
        if loaded is None:
            loaded = RuntimeError(f"no function was sent for run {run} (engine bug)")
        if isinstance(loaded, BaseException):
            self._reply(ERROR, frame, pack_error(loaded, where="function"))
            return
        fn, extra_args = loaded
        try:
            items = pickle.loads(data)
        except BaseException as exc:
            self._reply(ERROR, frame, pack_error(exc, where="items"))
            return
        groups = items if kind == PACK else [items]
        started = time.perf_counter()
        stop = _CancelCheck(self, run, started)
        replies: list[list[bytes]] = []
        board = self.board
        for offset, group in enumerate(groups):
            index = first + offset
            if board is not None:
                # Crash attribution for packs: the caller reads which chunk
                # ran when this process died (FAULTS.md #1: "the chunk").
                BOARD_SLOT.pack_into(board.buf, self.slot_offset, run, index)
            try:
                # as_worker=False: the whole process is marked a worker
                # (worker_main), so a nested executor runs serially without
                # the per-chunk context manager (2 us a chunk, W4).
                results, compute_s = run_chunk(
                    fn, group, extra_args, is_cancelled=stop, as_worker=False
                )
                wait_s = started - received_at if offset == 0 else 0.0
                if kind == PACK and is_plain(results):
                    meta = RESULT_META.pack(compute_s, wait_s, WHOLE_LIST)
                    replies.append([meta, results])  # pickled with the pack
                else:
                    replies.append(encode_results(results, start, compute_s, wait_s))
            except CancelledError as exc:
                if stop.fired:
                    self._reply(CANCELLED, frame)
                else:  # fn itself raised the engine's CancelledError
                    error = pack_error(exc, where="fn")
                    send_frame(self.sock, ERROR, run, index, start, error)
                return
            except BaseException as exc:
                # BaseException too: fn calling sys.exit() is reported, as
                # ProcessPoolExecutor does, and the worker lives on.
                send_frame(
                    self.sock, ERROR, run, index, start, pack_error(exc, where="fn")
                )
                return
            start += len(group)
        if kind == TASK:
            self._reply(RESULT, frame, *replies[0])
            return
        if all(type(reply[-1]) is list for reply in replies):
            # Every chunk's results are plain: one pickle for the pack.
            metas = b"".join(reply[0] for reply in replies)
            body = pickle.dumps([reply[1] for reply in replies], protocol=5)
            self._reply(RESULT_PACK, frame, PLAIN_PACK, metas, body)
            return
        parts = [
            [reply[0], pickle.dumps(reply[1], 5)] if type(reply[-1]) is list else reply
            for reply in replies
        ]
        lengths = array("Q", [sum(len(part) for part in reply) for reply in parts])
        self._reply(
            RESULT_PACK, frame, lengths.tobytes(), *[p for r in parts for p in r]
        )

    def poll(self, run: int) -> bool:
        """Read frames that arrived meanwhile; return True to stop the chunk."""
        if os.getppid() != self.parent_pid:
            os._exit(0)  # the supervisor is gone (macOS: no PDEATHSIG)
        while True:
            ready, _, _ = select.select([self.sock], [], [], 0)
            if not ready:
                break
            if not self.reader.receive(self.sock):
                self.eof = True  # the caller closed us: stop now
                return True
        keep: collections.deque[Frame] = collections.deque()
        for frame in self.reader.frames:
            if frame[0] == CANCEL:
                self.cancelled.add(frame[1])
            else:
                keep.append(frame)  # tasks and the rest keep their order
        self.reader.frames = keep
        return run in self.cancelled


class _CancelCheck:
    """``is_cancelled`` for run_chunk: a clock read per item, a poll per 5 ms."""

    __slots__ = ("fired", "next_poll", "run", "worker")

    def __init__(self, worker: _Worker, run: int, now: float) -> None:
        self.worker = worker
        self.run = run
        self.next_poll = now + CANCEL_POLL_S
        self.fired = False

    def __call__(self) -> bool:
        now = time.perf_counter()
        if now < self.next_poll:
            return False
        self.next_poll = now + CANCEL_POLL_S
        self.fired = self.worker.poll(self.run)
        return self.fired
