"""engine._winjob against a fake kernel32, and its wiring in SupervisorProcess.

No Windows runner here: these tests pin the call sequence, the structure
layout (sizes and offsets from the Windows SDK headers), the failure paths and
the handle bookkeeping. Nothing starts a process.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import subprocess
import sys
import threading
from ctypes import wintypes
from types import SimpleNamespace
from typing import Any

import pytest

from engine import _winjob, supervisor

JOB = 0x7F00_0000_0010  # above 2**32: a truncated handle would not match
PROCESS = 0x7F00_0000_0020
PID = 4242


class FakeKernel32:
    """Records every call; each function returns what the test configured."""

    def __init__(
        self,
        *,
        job: Any = JOB,
        set_ok: int = 1,
        process: Any = PROCESS,
        assign_ok: int = 1,
        raise_in: str = "",
    ) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.limits: list[tuple[int, int, int]] = []  # (flags, size, sizeof)
        self._job, self._set_ok = job, set_ok
        self._process, self._assign_ok = process, assign_ok
        self._raise_in = raise_in

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        if call[0] == self._raise_in:
            raise ctypes.ArgumentError(f"{call[0]}: wrong type")

    def CreateJobObjectW(self, attributes: Any, name: Any) -> Any:
        self._record("CreateJobObjectW", attributes, name)
        return self._job

    def SetInformationJobObject(
        self, job: Any, info_class: int, info: Any, size: int
    ) -> int:
        self._record("SetInformationJobObject", job, info_class, size)
        structure = info._obj  # byref(structure)
        assert isinstance(structure, _winjob.NATIVE.extended)
        flags = structure.BasicLimitInformation.LimitFlags
        self.limits.append((flags, size, ctypes.sizeof(structure)))
        return self._set_ok

    def OpenProcess(self, access: int, inherit: bool, pid: int) -> Any:
        self._record("OpenProcess", access, inherit, pid)
        return self._process

    def AssignProcessToJobObject(self, job: Any, process: Any) -> int:
        self._record("AssignProcessToJobObject", job, process)
        return self._assign_ok

    def CloseHandle(self, handle: Any) -> int:
        self._record("CloseHandle", handle)
        return 1

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]

    def closed(self) -> list[Any]:
        return [call[1] for call in self.calls if call[0] == "CloseHandle"]


def test_contain_creates_a_kill_on_close_job_and_assigns_the_process() -> None:
    kernel32 = FakeKernel32()
    job = _winjob.contain(PID, kernel32=kernel32)

    assert job is not None
    assert job.is_open
    assert kernel32.names() == [
        "CreateJobObjectW",
        "SetInformationJobObject",
        "OpenProcess",
        "AssignProcessToJobObject",
        "CloseHandle",
    ]
    # Unnamed, and NULL security attributes: the handle is not inheritable.
    assert kernel32.calls[0] == ("CreateJobObjectW", None, None)
    assert kernel32.calls[1][:3] == ("SetInformationJobObject", JOB, 9)
    ((flags, size, sizeof),) = kernel32.limits
    assert flags == 0x2000  # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE, nothing else
    assert size == sizeof == ctypes.sizeof(_winjob.NATIVE.extended)
    _, access, inherit, pid = kernel32.calls[2]
    assert access == 0x0100 | 0x0001  # PROCESS_SET_QUOTA | PROCESS_TERMINATE
    assert not inherit
    assert pid == PID
    assert kernel32.calls[3] == ("AssignProcessToJobObject", JOB, PROCESS)
    # The process handle is closed at once; the job handle stays open.
    assert kernel32.closed() == [PROCESS]


def test_close_closes_the_job_handle_exactly_once() -> None:
    kernel32 = FakeKernel32()
    job = _winjob.contain(PID, kernel32=kernel32)
    assert job is not None

    threads = [threading.Thread(target=job.close) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    job.close()

    assert not job.is_open
    assert kernel32.closed() == [PROCESS, JOB]


@pytest.mark.parametrize("null", [0, None], ids=["zero", "none"])
def test_no_job_when_create_fails(null: Any, caplog: pytest.LogCaptureFixture) -> None:
    kernel32 = FakeKernel32(job=null)
    with caplog.at_level(logging.DEBUG, logger="engine"):
        assert _winjob.contain(PID, kernel32=kernel32) is None
    assert kernel32.names() == ["CreateJobObjectW"]  # nothing to close
    assert "CreateJobObjectW failed" in caplog.text
    assert str(PID) in caplog.text


@pytest.mark.parametrize(
    ("fake", "failed", "closed"),
    [
        ({"set_ok": 0}, "SetInformationJobObject", [JOB]),
        ({"process": 0}, "OpenProcess", [JOB]),
        ({"assign_ok": 0}, "AssignProcessToJobObject", [PROCESS, JOB]),
    ],
    ids=["set-information", "open-process", "assign"],
)
def test_a_refused_step_closes_every_handle_and_returns_none(
    fake: dict[str, Any],
    failed: str,
    closed: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    kernel32 = FakeKernel32(**fake)
    with caplog.at_level(logging.DEBUG, logger="engine"):
        assert _winjob.contain(PID, kernel32=kernel32) is None
    assert kernel32.closed() == closed
    assert kernel32.names()[-len(closed) - 1] == failed
    assert f"{failed} failed" in caplog.text
    assert all(record.levelno == logging.DEBUG for record in caplog.records)


@pytest.mark.parametrize(
    "raise_in", ["SetInformationJobObject", "OpenProcess", "AssignProcessToJobObject"]
)
def test_an_unexpected_error_propagates_without_leaking_the_job(
    raise_in: str,
) -> None:
    kernel32 = FakeKernel32(raise_in=raise_in)
    with pytest.raises(ctypes.ArgumentError):
        _winjob.contain(PID, kernel32=kernel32)
    assert kernel32.closed().count(JOB) == 1


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="64-bit layout")
def test_native_layout_matches_windows_x64() -> None:
    native = _winjob.NATIVE
    assert ctypes.sizeof(native.io_counters) == 48
    assert ctypes.sizeof(native.basic) == 64
    assert ctypes.sizeof(native.extended) == 144
    assert native.basic.LimitFlags.offset == 16
    assert native.basic.MinimumWorkingSetSize.offset == 24
    assert native.basic.Affinity.offset == 48
    assert native.basic.SchedulingClass.offset == 60
    assert native.extended.IoInfo.offset == 64
    assert native.extended.ProcessMemoryLimit.offset == 112
    assert native.extended.PeakJobMemoryUsed.offset == 136


@pytest.mark.skipif(
    ctypes.alignment(ctypes.c_int64) != 8,
    reason="LARGE_INTEGER is 8-aligned on Windows x86; this host's int64 is not",
)
def test_32_bit_layout_matches_windows_x86() -> None:
    x86 = _winjob.layout(ctypes.c_uint32)
    assert ctypes.sizeof(x86.io_counters) == 48
    assert ctypes.sizeof(x86.basic) == 48
    assert ctypes.sizeof(x86.extended) == 112
    assert x86.basic.MinimumWorkingSetSize.offset == 20
    assert x86.basic.SchedulingClass.offset == 40
    assert x86.extended.IoInfo.offset == 48
    assert x86.extended.ProcessMemoryLimit.offset == 96


class _Untouchable:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"ctypes.windll.{name} touched off Windows")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("ctypes.WinDLL called off Windows")


@pytest.mark.skipif(sys.platform == "win32", reason="the non-Windows no-op")
def test_contain_is_a_no_op_off_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes, "windll", _Untouchable(), raising=False)
    monkeypatch.setattr(ctypes, "WinDLL", _Untouchable(), raising=False)
    assert _winjob.contain(os.getpid()) is None


def test_kernel32_gets_handle_sized_prototypes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[tuple[str, dict[str, Any]]] = []

    def win_dll(name: str, **kwargs: Any) -> SimpleNamespace:
        opened.append((name, kwargs))
        names = (
            "CreateJobObjectW",
            "SetInformationJobObject",
            "OpenProcess",
            "AssignProcessToJobObject",
            "CloseHandle",
        )
        return SimpleNamespace(**{name: SimpleNamespace() for name in names})

    monkeypatch.setattr(ctypes, "WinDLL", win_dll, raising=False)
    kernel32 = _winjob._load_kernel32()

    assert opened == [("kernel32", {"use_last_error": True})]
    # The default restype c_int would truncate a 64-bit HANDLE.
    assert kernel32.CreateJobObjectW.restype is wintypes.HANDLE
    assert kernel32.OpenProcess.restype is wintypes.HANDLE
    assert kernel32.AssignProcessToJobObject.argtypes == (
        wintypes.HANDLE,
        wintypes.HANDLE,
    )
    assert kernel32.CloseHandle.argtypes == (wintypes.HANDLE,)
    assert len(kernel32.SetInformationJobObject.argtypes) == 4


# -- the wiring in SupervisorProcess (Popen and contain() replaced) ----------------------


class FakePopen:
    """Popen without a process; ``code`` is what poll()/wait() report."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.pid = PID
        self.stdin = io.BytesIO()
        self.code: int | None = None
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        if self.code is None:
            raise subprocess.TimeoutExpired("supervisor", timeout or 0)
        return self.code


class FakeJob:
    def __init__(self, stdin_written: bool) -> None:
        self.stdin_written = stdin_written
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


Wired = tuple[supervisor.SupervisorProcess, FakePopen, list[FakeJob]]


@pytest.fixture
def windows_supervisor() -> Wired:
    popens: list[FakePopen] = []
    jobs: list[FakeJob] = []

    def popen(*args: Any, **kwargs: Any) -> FakePopen:
        popens.append(FakePopen())
        return popens[-1]

    def contain(pid: int) -> FakeJob:
        assert pid == PID
        jobs.append(FakeJob(stdin_written=bool(popens[-1].stdin.getvalue())))
        return jobs[-1]

    # A context of its own: sys.platform is back before the test body runs.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", popen)
        patch.setattr(supervisor, "_tracker_fd", lambda: None)
        patch.setattr(_winjob, "contain", contain)
        patch.setattr(sys, "platform", "win32")
        process = supervisor.SupervisorProcess({})
    return process, popens[0], jobs


def test_supervisor_joins_the_job_before_it_reads_its_spec(
    windows_supervisor: Wired,
) -> None:
    _, _, jobs = windows_supervisor
    (job,) = jobs
    # The supervisor blocks on its spec, so it cannot have spawned a worker
    # outside the job yet.
    assert not job.stdin_written


def test_supervisor_closes_the_job_only_after_it_exited(
    windows_supervisor: Wired,
) -> None:
    process, popen, (job,) = windows_supervisor
    assert process.poll() is None
    assert process.wait(0) is None
    assert job.closes == 0  # closing now would kill the running supervisor

    popen.code = 0
    assert process.poll() == 0
    assert job.closes == 1
    assert process.wait(1.0) == 0
    assert job.closes == 2  # asked again; Job.close() is idempotent (tested above)


def test_forget_drops_the_job_without_closing_it(
    windows_supervisor: Wired,
) -> None:
    process, popen, (job,) = windows_supervisor
    process.forget()
    popen.code = 0
    process.poll()
    assert job.closes == 0


@pytest.mark.skipif(sys.platform == "win32", reason="the non-Windows path")
def test_supervisor_makes_no_job_off_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    def contain(pid: int) -> None:
        raise AssertionError("contain() called off Windows")

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(supervisor, "_tracker_fd", lambda: None)
    monkeypatch.setattr(_winjob, "contain", contain)
    process = supervisor.SupervisorProcess({})
    process.forget()
