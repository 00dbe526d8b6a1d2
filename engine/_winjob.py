"""Windows: kill the supervisor and its workers with the caller (a Job Object).

::

    caller: holds the only handle to a kill-on-close job (not inheritable)
      └─ Popen ──▶ supervisor, assigned to the job ──spawn──▶ workers (inherit it)
    caller dies (any way) ──▶ kernel closes its handles ──▶ job's last handle
    gone ──▶ the kernel terminates every process in the job

Elsewhere only the supervisor notices a dead caller (control-socket EOF, a
changed ``getppid()``; FAULTS.md #7). ``contain()`` never fails the pool: if
Windows refuses (before Windows 8 jobs do not nest: a caller in a job without
breakaway gets ERROR_ACCESS_DENIED), it logs at DEBUG and returns None, and
the supervisor's EOF watch still cleans up. Off Windows it returns None and
loads nothing. ``kernel32`` is injectable (tests/unit/test_winjob.py: a fake).
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from typing import Any, Final, NamedTuple, final

logger = logging.getLogger("engine")

JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE: Final = 0x2000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION: Final = 9  # JOBOBJECTINFOCLASS value
PROCESS_TERMINATE: Final = 0x0001
PROCESS_SET_QUOTA: Final = 0x0100
_REFUSED: Final = (
    "engine: %s failed (winerror %d); the supervisor (pid %d) is not in a "
    "kill-on-close job and relies on its own EOF watch if the caller dies"
)


class Layout(NamedTuple):
    """The job-limit structures for one pointer size."""

    io_counters: type[ctypes.Structure]
    basic: type[ctypes.Structure]
    extended: type[ctypes.Structure]


def layout(word: type[ctypes.c_uint32 | ctypes.c_uint64]) -> Layout:
    """Build the structures with ``word`` as SIZE_T / ULONG_PTR."""

    # IO_COUNTERS: six ULONGLONG
    class IoCounters(ctypes.Structure):
        _fields_ = [
            (f"{kind}{what}Count", ctypes.c_uint64)
            for what in ("Operation", "Transfer")
            for kind in ("Read", "Write", "Other")
        ]

    # JOBOBJECT_BASIC_LIMIT_INFORMATION
    class BasicLimitInformation(ctypes.Structure):
        _fields_ = [
            ("PerProcessUserTimeLimit", ctypes.c_int64),  # LARGE_INTEGER
            ("PerJobUserTimeLimit", ctypes.c_int64),
            ("LimitFlags", ctypes.c_uint32),  # DWORD
            ("MinimumWorkingSetSize", word),  # SIZE_T
            ("MaximumWorkingSetSize", word),
            ("ActiveProcessLimit", ctypes.c_uint32),
            ("Affinity", word),  # ULONG_PTR
            ("PriorityClass", ctypes.c_uint32),
            ("SchedulingClass", ctypes.c_uint32),
        ]

    # JOBOBJECT_EXTENDED_LIMIT_INFORMATION
    class ExtendedLimitInformation(ctypes.Structure):
        _fields_ = [
            ("BasicLimitInformation", BasicLimitInformation),
            ("IoInfo", IoCounters),
            ("ProcessMemoryLimit", word),  # SIZE_T
            ("JobMemoryLimit", word),
            ("PeakProcessMemoryUsed", word),
            ("PeakJobMemoryUsed", word),
        ]

    return Layout(IoCounters, BasicLimitInformation, ExtendedLimitInformation)


NATIVE: Final = layout(
    ctypes.c_uint64 if ctypes.sizeof(ctypes.c_void_p) == 8 else ctypes.c_uint32
)


@final
class Job:
    """An open kill-on-close job: closing it ends every process still in it."""

    def __init__(self, handle: Any, kernel32: Any) -> None:
        self._handle = handle
        self._kernel32 = kernel32
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._handle is not None

    def close(self) -> None:
        """Close the handle once; later calls do nothing (any thread)."""
        # No __del__ on purpose: a garbage-collected or forgotten Job keeps
        # the handle until the caller exits, which is exactly when it must go.
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            self._kernel32.CloseHandle(handle)


def contain(pid: int, *, kernel32: Any = None) -> Job | None:
    """Put process ``pid`` in a new kill-on-close job held by this process.

    Parameters
    ----------
    pid
        The supervisor, started but not yet running workers.
    kernel32
        Stands in for kernel32.dll (tests); None loads it, on Windows only.

    Returns
    -------
    Job or None
        The open job (close it only after ``pid`` exited: closing kills);
        None off Windows or when Windows refused (logged at DEBUG).
    """
    if kernel32 is None:
        if sys.platform != "win32":
            return None
        kernel32 = _load_kernel32()
    # NULL security attributes: the handle is not inheritable. If the
    # supervisor inherited it, the job would outlive the caller.
    job = kernel32.CreateJobObjectW(None, None)
    if not job:
        _refused("CreateJobObjectW", pid)
        return None
    joined = False
    try:
        joined = _set_kill_on_close(kernel32, job, pid) and _assign(kernel32, job, pid)
    finally:
        if not joined:  # refused, or an unexpected error: never leak the job
            kernel32.CloseHandle(job)
    return Job(job, kernel32) if joined else None


def _set_kill_on_close(kernel32: Any, job: Any, pid: int) -> bool:
    info = NATIVE.extended()
    info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
    limits = (JOB_OBJECT_EXTENDED_LIMIT_INFORMATION, ctypes.byref(info))
    if kernel32.SetInformationJobObject(job, *limits, ctypes.sizeof(info)):
        return True
    return _refused("SetInformationJobObject", pid)


def _assign(kernel32: Any, job: Any, pid: int) -> bool:
    # By pid rather than Popen's private _handle. The pid cannot have been
    # reused: the caller's Popen holds a handle to the process, which keeps
    # its pid reserved even if it already exited.
    process = kernel32.OpenProcess(PROCESS_SET_QUOTA | PROCESS_TERMINATE, False, pid)
    if not process:
        return _refused("OpenProcess", pid)
    try:
        if kernel32.AssignProcessToJobObject(job, process):
            return True
        return _refused("AssignProcessToJobObject", pid)
    finally:
        kernel32.CloseHandle(process)


def _refused(call: str, pid: int) -> bool:
    # Read first: any later foreign call may overwrite the saved error.
    error = ctypes.get_last_error() if sys.platform == "win32" else 0
    logger.debug(_REFUSED, call, error, pid)
    return False


def _load_kernel32() -> Any:
    from ctypes import wintypes

    # A private WinDLL, not ctypes.windll.kernel32: setting prototypes on the
    # shared one would change them for every other user in the process.
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    # HANDLE restypes matter: the default c_int truncates 64-bit handles.
    handle, dword, ok = wintypes.HANDLE, wintypes.DWORD, wintypes.BOOL
    prototypes = {
        "CreateJobObjectW": (handle, (wintypes.LPVOID, wintypes.LPCWSTR)),
        "SetInformationJobObject": (ok, (handle, ctypes.c_int, ctypes.c_void_p, dword)),
        "OpenProcess": (handle, (dword, ok, dword)),
        "AssignProcessToJobObject": (ok, (handle, handle)),
        "CloseHandle": (ok, (handle,)),
    }
    for name, (restype, argtypes) in prototypes.items():
        function = getattr(kernel32, name)
        function.restype, function.argtypes = restype, argtypes
    return kernel32
