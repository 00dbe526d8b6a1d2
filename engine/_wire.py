"""The wire format between caller, supervisor and workers: frames, handshake, results.

::

    frame = HEADER(size, kind, run, chunk, aux) + payload
    kinds:  caller -> worker   FUNC TASK PACK SLOT CANCEL RELEASE EXIT
            worker -> caller   HELLO RESULT RESULT_PACK ERROR CANCELLED
            caller <-> supervisor   SUPERVISOR_HELLO CONTROL

Both ends share this module: the worker loop (``engine._worker``), the
supervisor (``engine._supervisor_main``), the caller's dispatcher and the
joblib/dask strategies, which reuse how results and exceptions travel. It
imports only the standard library (cloudpickle lazily, for results plain
pickle refuses), because the supervisor imports it and must stay light.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import pickle
import secrets
import socket
import struct
import time
import traceback
from array import array
from collections.abc import Sequence
from typing import Any, Final

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
PLAIN_PACK: Final = b"\xff" * 8
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
    if view[:8] == PLAIN_PACK:
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
