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

This module also holds the wire format both ends share: frames, the
handshake, and how results and exceptions travel. It imports only the
standard library and engine modules that do not import numpy, because the
supervisor imports it and must stay light; ``engine.payload`` (numpy,
cloudpickle) is imported by the worker itself, after its thread caps are set.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import os
import pickle
import secrets
import select
import signal
import socket
import struct
import sys
import time
import traceback
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from engine import _env, _state
from engine._chunks import run_chunk
from engine.errors import CancelledError

# -- frames ---------------------------------------------------------------------

# Every message is one frame: payload length, kind, run id, chunk index and
# one spare integer (start index of a task, pid of a hello), then the payload.
HEADER: Final = struct.Struct("<QBIQQ")
# Bodies at least this large are received straight into their own buffer
# (FAULTS.md #17: a huge result is not copied again while it arrives).
LARGE_BODY_BYTES: Final = 1 << 20
RECV_BYTES: Final = 1 << 18
# Below this, header and payload are joined and sent with one system call.
JOIN_BELOW_BYTES: Final = 1 << 16

# caller -> worker
FUNC: Final = 1  # payload: PayloadStore.dumps((fn, extra_args))
TASK: Final = 2  # chunk = chunk index, aux = start index; payload: the items
CANCEL: Final = 3  # stop the run's chunks at the next item
RELEASE: Final = 4  # the run is over: drop its function
EXIT: Final = 5  # leave the loop (worker_max_tasks recycling)
PACK: Final = 6  # consecutive tiny chunks: chunk = first index; payload: their items
SLOT: Final = 7  # aux = this worker's slot on the progress board; payload: its name
# worker -> caller
HELLO: Final = 10  # aux = pid
RESULT: Final = 11  # payload: encode_results()
ERROR: Final = 12  # payload: pack_error()
CANCELLED: Final = 13  # the chunk stopped because its run was cancelled
RESULT_PACK: Final = 14  # a PACK's results: lengths, then one RESULT payload each
# caller <-> supervisor
SUPERVISOR_HELLO: Final = 20  # aux = pid; payload: pickled diagnostics
CONTROL: Final = 21  # payload: a pickled tuple, see engine._supervisor_main


# One received message: (kind, run, chunk, aux, payload, received_at); the
# payload supports the buffer protocol. A plain tuple: a NamedTuple costs
# half a microsecond per frame, which W4's tiny chunks notice.
Frame = tuple[int, int, int, int, Any, float]


class FrameReader:
    """Split a socket's byte stream into frames.

    ``receive`` makes one ``recv`` call, so it never blocks on a socket that
    select/poll reported readable; complete frames collect in ``frames``.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        # recv_into a reused buffer: sock.recv(256 KiB) would allocate (and
        # on glibc mmap) 256 KiB per call, for a frame of a few dozen bytes.
        self._scratch = bytearray(RECV_BYTES)
        self._scratch_view = memoryview(self._scratch)
        self._body: bytearray | None = None
        self._body_header: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._filled = 0
        self.frames: collections.deque[Frame] = collections.deque()

    def receive(self, sock: socket.socket) -> bool:
        """Read what is available; return False at end of stream."""
        try:
            if self._body is not None:
                return self._receive_body(sock)
            count = sock.recv_into(self._scratch)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:  # ECONNRESET and friends: the peer is gone
            return False
        if not count:
            return False
        self._buffer += self._scratch_view[:count]
        self._split()
        return True

    def _receive_body(self, sock: socket.socket) -> bool:
        body = self._body
        assert body is not None
        with memoryview(body) as view:
            count = sock.recv_into(view[self._filled :])
        if count == 0:
            return False
        self._filled += count
        if self._filled == len(body):
            self._body = None
            self.frames.append((*self._body_header, body, time.perf_counter()))
        return True

    def _split(self) -> None:
        buffer = self._buffer
        now = time.perf_counter()
        while len(buffer) >= HEADER.size:
            size, kind, run, chunk, aux = HEADER.unpack_from(buffer)
            end = HEADER.size + size
            if len(buffer) >= end:
                if len(buffer) == end:
                    # The common case, one whole frame: hand over the buffer
                    # itself instead of copying the payload out of it.
                    payload: Any = memoryview(buffer)[HEADER.size :]
                    self._buffer = buffer = bytearray()
                else:
                    payload = buffer[HEADER.size : end]
                    del buffer[:end]
                self.frames.append((kind, run, chunk, aux, payload, now))
                continue
            if size >= LARGE_BODY_BYTES:
                body = bytearray(size)
                have = len(buffer) - HEADER.size
                body[:have] = buffer[HEADER.size :]
                buffer.clear()
                self._body, self._filled = body, have
                self._body_header = (kind, run, chunk, aux)
            return


def frame_parts(
    kind: int, run: int, chunk: int, aux: int, parts: Sequence[bytes | bytearray]
) -> list[bytes | bytearray]:
    """Return the byte strings of one frame: joined when small."""
    size = sum(len(part) for part in parts)
    header = HEADER.pack(size, kind, run, chunk, aux)
    if size < JOIN_BELOW_BYTES:
        return [b"".join((header, *parts))]
    return [header, *parts]


def send_frame(
    sock: socket.socket,
    kind: int,
    run: int = 0,
    chunk: int = 0,
    aux: int = 0,
    *parts: bytes | bytearray,
) -> None:
    """Send one frame on a blocking socket (worker and supervisor side)."""
    for data in frame_parts(kind, run, chunk, aux, parts):
        sock.sendall(data)


def read_frame(sock: socket.socket, reader: FrameReader) -> Frame | None:
    """Block until one frame arrives; ``None`` at end of stream."""
    while not reader.frames:
        if not reader.receive(sock):
            return None
    return reader.frames.popleft()


# -- the handshake --------------------------------------------------------------

# The caller accepts connections from its own supervisor and workers only:
# each side proves it knows the per-pool authkey (HMAC-SHA256 over the other
# side's nonce), as multiprocessing's Listener(authkey=) does. The caller's
# side is a non-blocking state machine in engine.supervisor.
MAGIC: Final = b"CEPE"
NONCE_BYTES: Final = 32
DIGEST_BYTES: Final = 32
HANDSHAKE_TIMEOUT_S: Final = 10.0


def digest(authkey: bytes, role: bytes, nonce: bytes) -> bytes:
    """Return the proof of ``authkey`` for ``nonce``, bound to a role."""
    return hmac.new(authkey, role + nonce, hashlib.sha256).digest()


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        more = sock.recv(count - len(data))
        if not more:
            msg = "the caller closed the connection during the handshake"
            raise ConnectionError(msg)
        data += more
    return data


def connect(family: str, address: Any, authkey: bytes) -> socket.socket:
    """Connect to the caller's listener and authenticate (client side)."""
    sock = socket.socket(getattr(socket, family), socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        sock.connect(address)
        hello = _recv_exactly(sock, len(MAGIC) + NONCE_BYTES)
        if not hello.startswith(MAGIC):
            msg = "the listener did not speak the engine's protocol"
            raise ConnectionError(msg)
        mine = secrets.token_bytes(NONCE_BYTES)
        sock.sendall(digest(authkey, b"C", hello[len(MAGIC) :]) + mine)
        answer = _recv_exactly(sock, DIGEST_BYTES)
        if not hmac.compare_digest(answer, digest(authkey, b"S", mine)):
            msg = "the listener failed authentication"
            raise ConnectionError(msg)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


# -- exceptions and results on the wire --------------------------------------------


class RemoteTraceback(Exception):  # noqa: N818 - CPython's name for it
    """The traceback of an exception raised in a worker (its ``__cause__``).

    The pattern of CPython's ``concurrent.futures.process._RemoteTraceback``.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def pack_error(exc: BaseException, *, where: str, item: int | None = None) -> bytes:
    """Serialise ``exc`` with its formatted traceback (worker side)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:
        message = repr(exc)
    try:
        data: bytes | None = pickle.dumps(exc, protocol=5)
        pickle.loads(data)  # exceptions whose __init__ needs other args fail here
    except Exception:
        data = None
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return pickle.dumps((data, kind, message, text, where, item, os.getpid()), 5)


def unpack_error(payload: Any) -> BaseException:
    """Rebuild an exception from ``pack_error`` (caller side).

    The original type comes back when it pickles; otherwise a
    ``RuntimeError`` that names it. Either way ``__cause__`` carries the
    remote traceback.
    """
    data, kind, message, text, where, item, pid = pickle.loads(payload)
    exc: Any = None
    if data is not None:
        try:
            exc = pickle.loads(data)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        msg = (
            f"{kind}: {message} (raised in worker process {pid}; the exception "
            "itself could not be sent back, so it is re-raised as RuntimeError)"
        )
        exc = RuntimeError(msg)
    exc.__cause__ = RemoteTraceback(f'\n"""\n{text}"""')
    note = _NOTES.get(where)
    if note is not None and hasattr(exc, "add_note"):
        exc.add_note(note.format(pid=pid, item=item))
    return exc


_NOTES: Final = {
    "function": (
        "while loading fn and its arguments in worker process {pid}; make sure the "
        "module defining them is importable there (installed, or on sys.path)"
    ),
    "items": "while unpickling the chunk's items in worker process {pid}",
}

# Exact types whose pickles always load back: a chunk of only these goes as
# one pickled list (the fast path that W4's trivial tasks take).
_ATOMS: Final = frozenset({int, float, str, bytes, bool, type(None), complex})
RESULT_META: Final = struct.Struct("<ddI")
# First 8 bytes of a RESULT_PACK whose chunks' results are all plain (a
# length no real pack has): then their metas, and one pickle of every list.
_PLAIN_PACK: Final = b"\xff" * 8
# One slot per worker on the progress board: (run id, chunk index) it runs.
BOARD_SLOT: Final = struct.Struct("<QQ")
WHOLE_LIST: Final = 0xFFFFFFFF


def is_plain(values: Any) -> bool:
    """Return True for a list/tuple/range of atoms or tuples of atoms."""
    kind = type(values)
    if kind is range:
        return True
    if kind is not list and kind is not tuple:
        return False
    atoms = _ATOMS
    for value in values:
        if type(value) in atoms:
            continue
        if type(value) is tuple and all(type(part) in atoms for part in value):
            continue
        return False
    return True


def _pickle_result(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(value, protocol=5)


def encode_results(
    results: list[Any], start: int, compute_s: float, wait_s: float
) -> list[bytes]:
    """Return the parts of a RESULT payload; one pickle per item unless plain.

    Per-item pickles let the caller name the item whose result fails to
    unpickle (FAULTS.md #6). Raises ``pickle.PicklingError`` naming the
    item whose result cannot be pickled (FAULTS.md #5).
    """
    if is_plain(results):
        meta = RESULT_META.pack(compute_s, wait_s, WHOLE_LIST)
        return [meta, pickle.dumps(results, protocol=5)]
    blobs = []
    for offset, value in enumerate(results):
        try:
            blobs.append(_pickle_result(value))
        except Exception as exc:
            msg = (
                f"the result of item {start + offset} ({type(value).__qualname__}) "
                f"cannot be pickled to send it back from worker process "
                f"{os.getpid()}: {exc}. Return picklable values from fn."
            )
            raise pickle.PicklingError(msg) from exc
    lengths = array("Q", [len(blob) for blob in blobs]).tobytes()
    meta = RESULT_META.pack(compute_s, wait_s, len(blobs))
    return [meta, lengths, *blobs]


def split_pack(payload: Any, count: int) -> list[Any]:
    """Split a RESULT_PACK payload into the RESULT payload of each chunk.

    For a plain pack (one pickle of every chunk's results) the items are
    ``(compute_s, wait_s, results)`` tuples, already decoded.
    """
    view = memoryview(payload)
    if view[:8] == _PLAIN_PACK:
        size = RESULT_META.size
        metas = view[8 : 8 + count * size]
        lists = pickle.loads(view[8 + count * size :])
        return [
            (*RESULT_META.unpack_from(metas, i * size)[:2], results)
            for i, results in enumerate(lists)
        ]
    lengths = array("Q")
    lengths.frombytes(view[: 8 * count])
    offset = 8 * count
    parts = []
    for length in lengths:
        parts.append(view[offset : offset + length])
        offset += length
    return parts


def decode_results(payload: Any, start: int) -> tuple[list[Any], float, float]:
    """Return ``(results, compute_s, wait_s)`` of a RESULT payload (caller side).

    Raises ``pickle.UnpicklingError`` naming the item whose result cannot be
    unpickled here.
    """
    view = memoryview(payload)
    compute_s, wait_s, count = RESULT_META.unpack_from(view)
    body = view[RESULT_META.size :]
    if count == WHOLE_LIST:
        return pickle.loads(body), compute_s, wait_s
    lengths = array("Q")
    lengths.frombytes(body[: 8 * count])
    offset = 8 * count
    results = []
    for index, length in enumerate(lengths):
        blob = body[offset : offset + length]
        offset += length
        try:
            results.append(pickle.loads(blob))
        except Exception as exc:
            msg = (
                f"the result of item {start + index} could not be unpickled in the "
                f"caller: {exc!r}. The worker returned an object whose class or "
                "reconstruction is not available in this process; return plain "
                "data (numbers, strings, numpy arrays) from fn."
            )
            raise pickle.UnpicklingError(msg) from exc
    return results, compute_s, wait_s


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
            self._reply(RESULT_PACK, frame, _PLAIN_PACK, metas, body)
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
