"""The caller's side of the supervisor: launch it, listen, authenticate, frame.

::

    caller process                                   supervisor (spawned)
      Endpoint: listening socket ◀── connect + handshake ── engine._supervisor_main
        │ (abstract AF_UNIX on Linux,                        │ forks/spawns workers,
        │  a private path on macOS,                          │ each connects back too
        │  loopback TCP on Windows)                          ▼
        ├─ Channel (supervisor): CONTROL frames ──▶ kill / segments / shutdown
        │                        ◀── started / died
        └─ Channel (one per worker): tasks and results (engine._wire)

    launch_supervisor(): python -c _BOOTSTRAP, the spec on stdin, the
    resource tracker's fd passed down (SHM-NOTES.md P2)

Everything here is driven by the processes strategy's dispatcher thread
(engine.strategies._dispatch): ``Channel`` and ``Endpoint`` never block, so
one thread can serve every connection, and a worker that stops reading can
never stall the caller (the classic pipe deadlock when both ends write).

Why the supervisor is launched with ``subprocess`` and a tiny bootstrap
instead of ``multiprocessing``'s spawn: spawn would import the caller's
``__main__`` in the supervisor (the user's script with its numpy, sklearn...)
and unpickling our own entry point would import the ``engine`` package, whose
``__init__`` imports numpy. The supervisor must stay a bare interpreter with
no threads (FAULTS.md #12): the bootstrap loads only ``engine._supervisor_main``
and its light dependencies, and defers the package ``__init__``.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import hmac
import os
import pickle
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from engine._wire import (
    DIGEST_BYTES,
    HANDSHAKE_TIMEOUT_S,
    HEADER,
    JOIN_BELOW_BYTES,
    MAGIC,
    NONCE_BYTES,
    FrameReader,
    digest,
)
from engine.errors import BrokenExecutorError

if TYPE_CHECKING:
    from engine._winjob import Job

AUTHKEY_BYTES: Final = 32
LISTEN_BACKLOG: Final = 128

# Run by ``python -c`` in the new supervisor: read the spec from stdin, make
# ``engine`` importable without running its __init__ (no numpy), and hand
# over. Kept tiny: everything else is ordinary code in _supervisor_main.
_BOOTSTRAP: Final = """\
import importlib.machinery, importlib.util, pickle, sys
spec = pickle.load(sys.stdin.buffer)
sys.path[:] = spec["sys_path"]
found = importlib.machinery.PathFinder.find_spec("engine", [spec["engine_root"]])
sys.modules["engine"] = importlib.util.module_from_spec(found)
from engine._supervisor_main import main
sys.exit(main(spec))
"""


def encode_control(*message: Any) -> bytes:
    """Return the payload of a CONTROL frame: a pickled tuple of builtins."""
    return pickle.dumps(message, protocol=5)


def decode_control(payload: Any) -> tuple[Any, ...]:
    """Return the tuple of a CONTROL frame."""
    return pickle.loads(payload)


# -- listening -----------------------------------------------------------------------


class Endpoint:
    """The caller's listening socket; its address and authkey go to the children.

    Called from the dispatcher thread only, except ``close`` at shutdown.
    """

    def __init__(self) -> None:
        # Workers unpickle what arrives on these sockets, so only processes
        # that know the authkey may connect (multiprocessing's Listener does
        # the same); the key reaches the children on stdin / in their spec,
        # never on a command line that `ps` shows.
        self.authkey = secrets.token_bytes(AUTHKEY_BYTES)
        self._directory: str | None = None
        if sys.platform == "win32":
            # Windows: named pipes cannot be waited on together with
            # sockets by one selector; loopback TCP can.
            self.family = "AF_INET"
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            self.address: Any = sock.getsockname()
        else:
            self.family = "AF_UNIX"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if sys.platform.startswith("linux"):
                # Abstract namespace: nothing in the file system to leak.
                self.address = f"\0cepe-{os.getpid()}-{secrets.token_hex(8)}"
            else:
                # macOS: a short private path (sun_path holds 104 bytes).
                self._directory = tempfile.mkdtemp(prefix="cepe-")
                self.address = str(Path(self._directory) / "s")
            sock.bind(self.address)
        # Replacement workers may connect while the dispatcher is busy: a
        # deep backlog keeps their connect() from failing meanwhile.
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)  # accept() runs in the dispatcher's step only
        self.sock = sock

    @property
    def cleanup_paths(self) -> list[str]:
        """File-system paths the supervisor removes if the caller dies."""
        return [self._directory] if self._directory else []

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Channel | None:
        """Accept one pending connection and start its handshake."""
        # The handshake continues without blocking (Channel._handshake): a
        # peer that connects and then stalls cannot freeze the dispatcher,
        # and is dropped after HANDSHAKE_TIMEOUT_S (Dispatcher._tick).
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        return Channel(conn, self.authkey)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


# -- one connection --------------------------------------------------------------------


class ChannelState(enum.Enum):
    """Where a connection is in its life."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


_CHANNEL_TRANSITIONS: Final = {
    ChannelState.HANDSHAKE: frozenset({ChannelState.OPEN, ChannelState.CLOSED}),
    ChannelState.OPEN: frozenset({ChannelState.CLOSED}),
    ChannelState.CLOSED: frozenset(),
}


class Channel:
    """A non-blocking, authenticated, framed connection to one child.

    Owned by the dispatcher thread (no lock: nothing else touches it).
    ``send`` queues what the socket cannot take now; the dispatcher flushes
    when the socket becomes writable.
    """

    def __init__(self, sock: socket.socket, authkey: bytes) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.reader = FrameReader()
        self.state = ChannelState.HANDSHAKE
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        self._authkey = authkey
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._answer = b""
        self._pending: collections.deque[memoryview] = collections.deque()
        self._out = bytearray()  # queued small frames, sent by flush()
        self.broken = False
        self._write(MAGIC + self._nonce)

    def _move(self, target: ChannelState) -> None:
        if target not in _CHANNEL_TRANSITIONS[self.state]:
            msg = f"channel cannot move from {self.state.value} to {target.value}"
            raise RuntimeError(msg)
        self.state = target

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def is_open(self) -> bool:
        return self.state is ChannelState.OPEN

    @property
    def wants_write(self) -> bool:
        return bool(self._pending or self._out)

    def on_readable(self) -> bool:
        """Read what arrived; return False when the peer is gone or refused."""
        if self.state is ChannelState.HANDSHAKE:
            return self._handshake()
        if self.state is ChannelState.CLOSED:
            return False
        return self.reader.receive(self.sock)

    def _handshake(self) -> bool:
        wanted = DIGEST_BYTES + NONCE_BYTES
        try:
            data = self.sock.recv(wanted - len(self._answer))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        self._answer += data
        if len(self._answer) < wanted:
            return True
        proof, theirs = self._answer[:DIGEST_BYTES], self._answer[DIGEST_BYTES:]
        if not hmac.compare_digest(proof, digest(self._authkey, b"C", self._nonce)):
            return False  # not one of ours: drop it without a word
        self._write(digest(self._authkey, b"S", theirs))
        self._move(ChannelState.OPEN)
        return True

    def send(
        self, kind: int, run: int, chunk: int, aux: int, payload: bytes = b""
    ) -> None:
        """Queue one frame and write what the socket takes now."""
        self.queue(kind, run, chunk, aux, payload)
        self.flush()

    def queue(
        self, kind: int, run: int, chunk: int, aux: int, payload: bytes = b""
    ) -> None:
        """Queue one frame for the next ``flush``: many tiny frames, one call."""
        if self.state is not ChannelState.OPEN or self.broken:
            return
        out = self._out
        out += HEADER.pack(len(payload), kind, run, chunk, aux)
        if len(payload) < JOIN_BELOW_BYTES:
            out += payload
        else:  # large: no copy into the buffer
            self._seal()
            self._pending.append(memoryview(payload))

    def _seal(self) -> None:
        if self._out:
            self._pending.append(memoryview(self._out))
            self._out = bytearray()

    def _write(self, data: bytes | bytearray) -> None:
        # Never block: a worker busy in a long item does not read its socket,
        # and a blocking send of a large chunk would stall every other worker
        # (and deadlock if that worker is itself blocked sending a result).
        if self._pending:
            self._pending.append(memoryview(data))
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # EPIPE/ECONNRESET: the worker died. Its EOF and the supervisor's
            # ("died", ...) settle its chunks (FAULTS.md #1), not this write.
            self.broken = True
            return
        if sent < len(data):
            self._pending.append(memoryview(data)[sent:])

    def flush(self) -> None:
        """Write queued bytes until the socket is full or the queue empty."""
        self._seal()
        pending = self._pending
        while pending:
            head = pending[0]
            try:
                sent = self.sock.send(head)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.broken = True
                pending.clear()
                return
            if sent < len(head):
                pending[0] = head[sent:]
                return
            pending.popleft()

    def drain(self) -> None:
        """Read every byte already buffered (the peer process is dead)."""
        # Called when the supervisor reports a death before we saw the EOF:
        # a result the worker sent just before dying must still count.
        while self.state is ChannelState.OPEN:
            try:
                ready, _, _ = select.select([self.sock], [], [], 0)
            except (OSError, ValueError):
                return
            if not ready or not self.reader.receive(self.sock):
                return

    def close(self) -> None:
        if self.state is not ChannelState.CLOSED:
            self._move(ChannelState.CLOSED)
        self._pending.clear()
        self._out = bytearray()
        with contextlib.suppress(OSError):
            self.sock.close()


# -- the supervisor process ----------------------------------------------------------------


def _interpreter_command() -> list[str]:
    from multiprocessing import spawn

    executable = os.fsdecode(spawn.get_executable())
    # Keep the caller's -X/-W/-O flags, as multiprocessing does.
    flags = getattr(subprocess, "_args_from_interpreter_flags", list)()
    return [executable, *flags, "-c", _BOOTSTRAP]


def _tracker_fd() -> int | None:
    if os.name != "posix":
        return None  # Windows: no resource tracker
    from multiprocessing import resource_tracker

    # SHM-NOTES.md P2: the supervisor and every worker share the caller's
    # tracker, so an attach is never tracked twice and a crash is cleaned.
    return resource_tracker.getfd()


class SupervisorProcess:
    """The launched supervisor: its pid, exit status, and a last-resort kill.

    Called from the dispatcher thread and, at shutdown, from the thread that
    shuts the pool down (after the dispatcher stopped).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        tracker = _tracker_fd()
        spec = {**spec, "tracker_fd": tracker}
        engine_root = str(Path(__file__).resolve().parent.parent)
        spec.setdefault("engine_root", engine_root)
        spec.setdefault("sys_path", list(sys.path))
        spec.setdefault("caller_pid", os.getpid())
        blob = pickle.dumps(spec, protocol=5)
        # close_fds: the supervisor must hold no copy of our sockets, or a
        # dead caller's connections would never reach EOF (SUPERVISOR-NOTES.md
        # pitfall 6). Not start_new_session: Ctrl-C reaches it, and it
        # ignores SIGINT on purpose (FAULTS.md #8). Never PR_SET_PDEATHSIG on
        # it (pitfall 7): it watches the caller itself (EOF + getppid()).
        self._popen = subprocess.Popen(
            _interpreter_command(),
            stdin=subprocess.PIPE,
            close_fds=True,
            pass_fds=() if tracker is None else (tracker,),
        )
        self.pid = self._popen.pid
        # FAULTS.md #7 on Windows: the kernel kills the supervisor and its
        # workers when our job handle closes, i.e. when we die. Done before
        # the spec is written: the supervisor waits for it on stdin, so no
        # worker exists yet that could start outside the job.
        self._job: Job | None = None
        if sys.platform == "win32":
            from engine._winjob import contain  # ctypes only where it is used

            self._job = contain(self.pid)
        stdin = self._popen.stdin
        assert stdin is not None
        try:
            stdin.write(blob)
            stdin.close()
        except OSError:
            pass  # it died at once; poll() says so and the pool reports it

    def poll(self) -> int | None:
        """Return the exit code, or ``None`` while it runs."""
        code = self._popen.poll()
        if code is not None:
            self._release_job()
        return code

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self._popen.kill()

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s``; return the exit code or ``None``."""
        try:
            code = self._popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        self._release_job()
        return code

    def forget(self) -> None:
        """Drop the handle without waiting (a forked child of the caller)."""
        # A child cannot wait() for its parent's child; marking it finished
        # keeps Popen.__del__ from trying. The job handle (Windows, where
        # there is no fork) belongs to the parent: dropped, never closed.
        self._popen.returncode = 0
        self._job = None

    def _release_job(self) -> None:
        # Only once the supervisor has exited: closing the job kills what is
        # still in it (a worker that outlived it, a process a task started).
        job = self._job
        if job is not None:
            job.close()


def supervisor_spec(
    endpoint: Endpoint,
    *,
    workers: int,
    start_method: str,
    environment: dict[str, str],
) -> dict[str, Any]:
    """Return what the supervisor needs (plain builtins: it is unpickled early)."""
    return {
        "family": endpoint.family,
        "address": endpoint.address,
        "authkey": endpoint.authkey,
        "workers": workers,
        "start_method": start_method,
        "environment": dict(environment),
        "cleanup_paths": endpoint.cleanup_paths,
    }


# -- the pool's lifecycle ------------------------------------------------------------


class PoolState(enum.Enum):
    """Where a process pool (supervisor and workers) is in its life."""

    STARTING = "starting"
    READY = "ready"
    BROKEN = "broken"
    CLOSING = "closing"
    CLOSED = "closed"


_POOL_TRANSITIONS: Final = {
    PoolState.STARTING: frozenset(
        {PoolState.READY, PoolState.BROKEN, PoolState.CLOSING}
    ),
    PoolState.READY: frozenset({PoolState.BROKEN, PoolState.CLOSING}),
    PoolState.BROKEN: frozenset({PoolState.CLOSING}),
    PoolState.CLOSING: frozenset({PoolState.CLOSED}),
    PoolState.CLOSED: frozenset(),
}


class PoolLifecycle:
    """The pool's state behind one lock, with why it broke (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = PoolState.STARTING
        self.error_type: type[BrokenExecutorError] = BrokenExecutorError
        self.reason = ""

    @property
    def state(self) -> PoolState:
        return self._state

    def move(
        self,
        target: PoolState,
        *,
        reason: str = "",
        error_type: type[BrokenExecutorError] = BrokenExecutorError,
    ) -> bool:
        """Move to ``target`` if the table allows it; return whether it moved."""
        with self._lock:
            if target not in _POOL_TRANSITIONS[self._state]:
                return False
            self._state = target
            if target is PoolState.BROKEN:
                self.reason, self.error_type = reason, error_type
            return True

    def failure(self) -> tuple[type[BrokenExecutorError], str] | None:
        """Return why maps cannot run on the pool, or None if they can."""
        state = self._state
        if state is PoolState.READY:
            return None
        if state is PoolState.BROKEN:
            return self.error_type, self.reason
        return BrokenExecutorError, f"the process pool is {state.value}"
