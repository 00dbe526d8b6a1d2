"""Shared-memory segments: naming, reserving, creating, opening and unlinking.

The segment level under ``engine.payload``, which decides what goes into a
segment and how it is read back. Rules (DESIGN.md section 6, SHM-NOTES.md):
the creator owns and unlinks; attachers never unlink and, on Python < 3.13,
never register with the resource tracker (gh-82300); space is reserved with
``posix_fallocate`` so a full ``/dev/shm`` raises ``PayloadError`` instead of
killing a process with SIGBUS (FAULTS.md #15); on Windows a segment lives
while a handle is open, so the owner keeps its handles until it unlinks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker, shared_memory
from typing import Final

from engine.errors import PayloadError

__all__ = [
    "PREFIX",
    "SHM_DIR",
    "OwnedSegments",
    "base36",
    "close_and_unlink",
    "close_quietly",
    "create_segment",
    "ensure_tracker",
    "open_attached",
    "reset_tracker_after_fork",
    "shm_free_bytes",
    "sweep_orphans",
    "unlink_owned",
    "unlink_segment",
]

PREFIX: Final = "cepe_"
SHM_DIR: Final = "/dev/shm"
# Random hex digits in a name: cepe_ (5) + base36 pid (<= 7) + _ (1) + 12
# = 25 characters, under macOS's 30 usable (PSHMNAMLEN 31 incl. "/").
_RANDOM_HEX_BYTES: Final = 6
_USE_POSIX_SHM: Final = os.name == "posix"
# gh-82300: track= exists from 3.13 (python/cpython#110778).
_HAS_TRACK_FLAG: Final = sys.version_info >= (3, 13)
_IS_LINUX: Final = sys.platform.startswith("linux")
_NO_FALLOCATE: Final = frozenset({errno.EOPNOTSUPP, errno.ENOSYS})


def base36(number: int) -> str:
    """Lowercase base-36 digits of ``number`` (the pid part of a name)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return out


def _new_name() -> str:
    return f"{PREFIX}{base36(os.getpid())}_{secrets.token_hex(_RANDOM_HEX_BYTES)}"


def _human(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB ({nbytes} bytes)"


# -- the resource tracker (gh-82300) ------------------------------------------

# Guards every SharedMemory construction of this module: an attach swaps
# resource_tracker.register for a no-op, and a create must not run meanwhile
# (it would lose the owner's registration, the crash net of SHM-NOTES P6).
_tracker_lock = threading.Lock()
_saved_register: Callable[..., None] | None = None


def _no_register(name: str, rtype: str) -> None:
    """Stand-in for resource_tracker.register while attaching (gh-82300)."""


@contextlib.contextmanager
def _untracked_attach() -> Iterator[None]:
    # gh-82300: on Python < 3.13, SharedMemory registers every attach with
    # the process's resource tracker; a tracker that is not the owner's
    # unlinks the segment when this process exits, and one that is prints
    # "leaked shared_memory" or KeyError tracebacks if we unregister. Making
    # register a no-op for the attach (the workaround posted in gh-82300,
    # 16/16 correct in SUPERVISOR-NOTES "Resource tracker") avoids both.
    global _saved_register
    with _tracker_lock:
        _saved_register = resource_tracker.register
        resource_tracker.register = _no_register
        try:
            yield
        finally:
            resource_tracker.register = _saved_register
            _saved_register = None


def reset_tracker_after_fork() -> None:
    """Fork reset of the workaround: fresh lock, real register hook."""
    global _tracker_lock, _saved_register
    # A fork taken while another thread was inside _untracked_attach() leaves
    # the no-op in place in the child; put the real register back.
    if _saved_register is not None and resource_tracker.register is _no_register:
        resource_tracker.register = _saved_register
    _saved_register = None
    _tracker_lock = threading.Lock()


def ensure_tracker() -> None:
    """Start this process's resource tracker if it is not running.

    Notes
    -----
    Call it before forking processes that will attach segments: fork
    children share the tracker only if it ran at fork time, otherwise each
    starts a private one (SHM-NOTES.md P2). No-op on Windows.
    """
    if _USE_POSIX_SHM:
        resource_tracker.ensure_running()


# -- opening segments --------------------------------------------------------


class _Segment(shared_memory.SharedMemory):
    """SharedMemory that stays quiet when collected while views still use it."""

    def __del__(self) -> None:
        # The stdlib's __del__ lets BufferError escape ("Exception ignored")
        # when numpy views outlive the handle, e.g. at interpreter exit. The
        # mapping then lives on inside the views and is unmapped with them.
        with contextlib.suppress(OSError, BufferError):
            self.close()


def close_quietly(segment: shared_memory.SharedMemory) -> None:
    """Close this process's handle; a view still using it keeps the mapping."""
    with contextlib.suppress(OSError, BufferError):
        segment.close()


def open_attached(name: str) -> _Segment:
    """Open an existing segment without registering it with the tracker."""
    if _HAS_TRACK_FLAG:
        return _Segment(name=name, track=False)  # type: ignore[call-arg]
    if not _USE_POSIX_SHM:
        return _Segment(name=name)  # Windows: no resource tracker
    with _untracked_attach():
        return _Segment(name=name)


# -- creating segments --------------------------------------------------------


def shm_free_bytes() -> int:
    """Free bytes in /dev/shm for an unprivileged writer."""
    stats = os.statvfs(SHM_DIR)
    return stats.f_bavail * stats.f_frsize


def _no_space(size: int, free: int) -> PayloadError:
    msg = (
        f"cannot place {_human(size)} in shared memory: {SHM_DIR} has "
        f"{_human(free)} free. Remedies: raise the automatic-sharing threshold "
        "so arrays this large are pickled instead (CE_PARALLEL token "
        "shm_threshold=, e.g. shm_threshold=1G, or "
        "ParallelConfig(shm_threshold_bytes=...)); or give the machine a larger "
        f"{SHM_DIR} (docker run --shm-size=2g, or mount -o remount,size=2G "
        f"{SHM_DIR})."
    )
    return PayloadError(msg)


def _reserve_linux(name: str, size: int, free_bytes: Callable[[], int]) -> None:
    """Create /dev/shm/<name> with ``size`` bytes reserved, or raise PayloadError."""
    free = free_bytes()
    if size > free:
        raise _no_space(size, free)
    path = os.path.join(SHM_DIR, name)
    # O_EXCL: a name collision raises FileExistsError and the caller retries.
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        # FAULTS.md #15: ftruncate (what SharedMemory does) reserves nothing,
        # and the first write past the free space kills us with SIGBUS;
        # posix_fallocate fails cleanly with ENOSPC instead.
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in _NO_FALLOCATE:
                raise
            os.ftruncate(fd, size)  # a filesystem without fallocate: best effort
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise _no_space(size, free_bytes()) from exc
        raise
    finally:
        os.close(fd)


def create_segment(
    size: int, *, free_bytes: Callable[[], int] = shm_free_bytes
) -> shared_memory.SharedMemory:
    """Create a segment of at least ``size`` bytes, registered with the tracker.

    ``free_bytes`` measures the free space of ``/dev/shm`` (Linux only).
    """
    size = max(size, 1)  # the OS refuses 0-byte segments; empty arrays use 1
    for _ in range(8):
        name = _new_name()
        try:
            if _IS_LINUX and os.path.isdir(SHM_DIR):
                _reserve_linux(name, size, free_bytes)
                try:
                    # Opening by name registers the owner with the resource
                    # tracker: the crash net that unlinks if we are killed.
                    with _tracker_lock:
                        return _Segment(name=name)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(SHM_DIR, name))
                    raise
            with _tracker_lock:
                return _Segment(name=name, create=True, size=size)
        except FileExistsError:
            continue
        except OSError as exc:
            msg = (
                f"cannot create a shared-memory segment of {_human(size)}: {exc}. "
                "Raise shm_threshold= (CE_PARALLEL) or "
                "ParallelConfig.shm_threshold_bytes to pickle such arrays instead."
            )
            raise PayloadError(msg) from exc
    msg = "cannot find a free shared-memory segment name after 8 attempts"
    raise PayloadError(msg)


# -- unlinking segments -------------------------------------------------------


def close_and_unlink(segment: shared_memory.SharedMemory) -> None:
    """Close and unlink ``segment``; quiet if it is already gone."""
    close_quietly(segment)
    # Gone already: removed behind our back (a user, a sweeper). Not
    # unregistering then is the stdlib's choice too: if the remover shared
    # our tracker it has unregistered, and a second UNREGISTER makes the
    # tracker print a KeyError traceback (SHM-NOTES P2).
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()


class OwnedSegments:
    """The segments one store created; shared by the store and its finalizer."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.segments: dict[str, shared_memory.SharedMemory] = {}


def unlink_owned(owned: OwnedSegments) -> None:
    """Unlink every segment of ``owned``; only its creating process does."""
    with owned.lock:
        if os.getpid() != owned.pid:
            owned.segments = {}
            return
        # One by one, removing each only once unlinked: a KeyboardInterrupt
        # here leaves the rest for the next close() or the finalizer at exit.
        while owned.segments:
            name = next(iter(owned.segments))
            close_and_unlink(owned.segments[name])
            del owned.segments[name]


# -- crash net ----------------------------------------------------------------


def _start_time(pid: int) -> float | None:
    """Linux: wall-clock start time of ``pid`` from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="ascii") as stat:
            boot = next(
                int(line.split()[1]) for line in stat if line.startswith("btime")
            )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _creator_dead(pid: int, modified: float) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    started = _start_time(pid)
    # A live process that started after the segment was last written cannot
    # have created it: the pid was reused. One second of slack covers the
    # clock-tick resolution of /proc start times.
    return started is not None and started > modified + 1.0


def unlink_segment(name: str) -> bool:
    """Unlink one segment by name, e.g. for an owner that died.

    Parameters
    ----------
    name : str
        A segment name from ``PayloadStore.segment_names``.

    Returns
    -------
    bool
        False if the segment was already gone.

    Notes
    -----
    Meant for the supervisor's crash net. Opening registers the name with
    this process's resource tracker and unlinking unregisters it; when that
    tracker is the dead owner's (spawned children share it), the owner's
    entry goes too, so the tracker warns about no "leaked" segment.
    """
    try:
        with _tracker_lock:
            segment = _Segment(name=name)
    except FileNotFoundError:
        return False
    close_and_unlink(segment)
    return True


def sweep_orphans() -> list[str]:
    """Unlink ``/dev/shm/cepe_*`` segments whose creating process is dead.

    Returns
    -------
    list of str
        Names removed. Always empty off Linux (no ``/dev/shm`` listing).

    Notes
    -----
    The creator pid is read from the name. Only segments owned by this
    user are considered. Containers that share ``/dev/shm`` but not the
    pid namespace (``--ipc=host``) see other containers' creators as dead:
    do not sweep there.
    """
    if not (_IS_LINUX and os.path.isdir(SHM_DIR)):
        return []
    removed = []
    uid = os.getuid()
    for entry in os.scandir(SHM_DIR):
        if not entry.name.startswith(PREFIX):
            continue
        try:
            pid = int(entry.name.split("_")[1], 36)
            stat = entry.stat(follow_symlinks=False)
        except (IndexError, ValueError, OSError):
            continue
        if stat.st_uid != uid or not _creator_dead(pid, stat.st_mtime):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed
