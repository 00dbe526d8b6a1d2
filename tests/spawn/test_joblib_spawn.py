"""The joblib strategy in a caller subprocess: __main__ functions, caller death, Ctrl-C.

Each test runs a small script in its own Python process (the caller), so a
real SIGKILL or SIGINT hits the caller, and checks that no worker, no
resource tracker, no ``cepe_*`` segment and no cancel-board file is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("joblib")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.spawn

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
NOTHING_LEFT_S = 3.0

PRELUDE = """
import functools, os, sys
import numpy as np
from engine import ParallelConfig, ParallelExecutor
from _tasks import sleep_in_worker
"""


def _start(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    script = tmp_path / "caller.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    env["TMPDIR"] = str(tmp_path)  # the cancel-board file lands here
    env.pop("CE_PARALLEL", None)
    return subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _segments_of(pid: int) -> list[str]:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    number, name = pid, ""
    while True:
        number, rest = divmod(number, 36)
        name = digits[rest] + name
        if number == 0:
            break
    shm = Path("/dev/shm")
    return sorted(p.name for p in shm.glob(f"cepe_{name}_*")) if shm.is_dir() else []


def _boards(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.glob("cepe-cancel-*"))


def _wait_ready(caller: subprocess.Popen[str]) -> None:
    assert caller.stdout is not None
    line = caller.stdout.readline()
    assert line.strip() == "ready", line + (
        caller.stderr.read() if caller.stderr else ""
    )
    time.sleep(0.5)  # the map is running now


def _assert_nothing_left(pid: int, descendants: list[psutil.Process]) -> None:
    deadline = time.monotonic() + NOTHING_LEFT_S
    while True:
        alive = [p.pid for p in descendants if _is_alive(p)]
        segments = _segments_of(pid)
        if not (alive or segments) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for process in descendants:  # never leave them to the next test
        if _is_alive(process):
            process.kill()
    assert not alive, f"processes left after the caller ended: {alive}"
    assert not segments, f"segments left: {segments}"


def _is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_main_module_function_and_shared_array_without_guard(tmp_path: Path) -> None:
    caller = _start(
        tmp_path,
        """
        def double_at(x, array):
            return float(array[x]) * 2

        with ParallelExecutor(strategy="joblib", max_workers=2, min_batch_size=1) as ex:
            handle = ex.share(np.arange(200_000, dtype=np.float64))
            print(ex.map(double_at, range(5), handle))
        """,
    )
    out, err = caller.communicate(timeout=60)
    assert caller.returncode == 0, err
    assert out.strip() == "[0.0, 2.0, 4.0, 6.0, 8.0]"
    assert "Traceback" not in err
    assert "leaked" not in err  # no resource-tracker warnings (gh-82300)


def test_caller_sigkilled_mid_map_leaves_nothing(tmp_path: Path) -> None:
    caller = _start(
        tmp_path,
        """
        fn = functools.partial(sleep_in_worker, caller_pid=os.getpid(), seconds=30.0)
        with ParallelExecutor(strategy="joblib", max_workers=2, min_batch_size=1) as ex:
            handle = ex.share(np.ones(300_000))
            ex.map(abs, range(4))
            print("ready", flush=True)
            ex.map(fn, range(8), chunk_size=1)
        """,
    )
    try:
        _wait_ready(caller)
        descendants = psutil.Process(caller.pid).children(recursive=True)
        assert len(descendants) >= 2
        assert _segments_of(caller.pid)
        assert _boards(tmp_path)
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=10)
        _assert_nothing_left(caller.pid, descendants)
        assert _boards(tmp_path) == []  # the workers removed the board file
    finally:
        if caller.poll() is None:
            caller.kill()
        caller.communicate()


def test_sigint_during_map_propagates_within_a_second(tmp_path: Path) -> None:
    caller = _start(
        tmp_path,
        """
        fn = functools.partial(sleep_in_worker, caller_pid=os.getpid(), seconds=30.0)
        with ParallelExecutor(strategy="joblib", max_workers=2, min_batch_size=1) as ex:
            ex.map(abs, range(4))
            print("ready", flush=True)
            try:
                ex.map(fn, range(8), chunk_size=1)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                raise
        """,
    )
    try:
        _wait_ready(caller)
        descendants = psutil.Process(caller.pid).children(recursive=True)
        started = time.monotonic()
        caller.send_signal(signal.SIGINT)
        out, err = caller.communicate(timeout=10)
        elapsed = time.monotonic() - started
        assert "interrupted" in out, err
        assert "KeyboardInterrupt" in err
        assert elapsed < 2.0, f"caller took {elapsed:.2f} s to exit after SIGINT"
        _assert_nothing_left(caller.pid, descendants)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.communicate()
