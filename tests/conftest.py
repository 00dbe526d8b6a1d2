"""Shared test setup: path markers, strategy fixtures and the leak check.

Every test runs under an autouse fixture that fails it when it leaves a child
process alive or a ``/dev/shm/cepe_*`` segment behind (as CPython's
``reap_children()`` and loky's ``check_no_running_workers`` do). The check
looks only at this pytest process's own children and segments, so it is safe
under ``pytest -n 2``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
if (
    str(TESTS) not in sys.path
):  # makes tests/_tasks.py importable, also in spawn children
    sys.path.insert(0, str(TESTS))

SHM_DIR = Path("/dev/shm")
LEAK_GRACE_S = 5.0

# A shell without job control starts background commands with SIGINT
# ignored, and an ignored signal stays ignored across exec: the Ctrl-C tests'
# callers then never see KeyboardInterrupt (4 of them failed in a
# `bash .ci/run &`). With Python's handler installed here, every child this
# process starts gets the default disposition at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# name -> ParallelConfig fields; every behavioural test runs once per case.
STRATEGY_CASES: dict[str, dict[str, object]] = {
    "serial": {"strategy": "serial"},
    "threads": {"strategy": "threads", "max_workers": 2},
    "processes-fork": {
        "strategy": "processes",
        "max_workers": 2,
        "start_method": "fork",
    },
    "processes-spawn": {
        "strategy": "processes",
        "max_workers": 2,
        "start_method": "spawn",
    },
    "joblib": {"strategy": "joblib", "max_workers": 2},
    "dask": {"strategy": "dask", "max_workers": 2},
}


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(TESTS).parts
        if parts and parts[0] in ("unit", "kernels", "integration"):
            item.add_marker(getattr(pytest.mark, parts[0]))


def _strategy_case(name: str) -> dict[str, object]:
    from engine import strategies

    fields = STRATEGY_CASES[name]
    reason = strategies.unavailable_reason(str(fields["strategy"]))
    if reason is not None:
        pytest.skip(f"strategy {fields['strategy']} unavailable: {reason}")
    return dict(fields)


@pytest.fixture(params=list(STRATEGY_CASES))
def strategy_fields(request: pytest.FixtureRequest) -> dict[str, object]:
    """ParallelConfig fields of one strategy case (serial is the oracle)."""
    return _strategy_case(request.param)


@pytest.fixture(params=[name for name in STRATEGY_CASES if name != "serial"])
def parallel_fields(request: pytest.FixtureRequest) -> dict[str, object]:
    """ParallelConfig fields of one parallel strategy case."""
    return _strategy_case(request.param)


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return out


def _creator_alive(name: str) -> bool:
    parts = name.split("_")
    try:
        pid = int(parts[1], 36)
    except (IndexError, ValueError):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _own_segments() -> set[str]:
    if not SHM_DIR.is_dir():
        return set()
    mine = f"cepe_{_base36(os.getpid())}_"
    found = set()
    for path in SHM_DIR.iterdir():
        name = path.name
        if name.startswith(mine) or (
            name.startswith("cepe_") and not _creator_alive(name)
        ):
            found.add(name)
    return found


# Long-lived per-process helpers, started once and kept by design: the
# multiprocessing (and loky) resource tracker. Everything else must go.
_HELPER_MARKERS = ("resource_tracker",)


def _is_helper(process: object) -> bool:
    import psutil

    try:
        cmdline = " ".join(process.cmdline())  # type: ignore[attr-defined]
    except psutil.Error:
        return False
    return any(marker in cmdline for marker in _HELPER_MARKERS)


def _children() -> set[int]:
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return set()
    return {child.pid for child in children if not _is_helper(child)}


def _engine_threads() -> set[str]:
    return {
        t.name
        for t in threading.enumerate()
        if t.name.startswith("engine-") and t.is_alive()
    }


@pytest.fixture(autouse=True)
def _no_leaks() -> object:
    """Fail a test that leaves processes, segments or engine threads behind."""
    children_before = _children()
    segments_before = _own_segments()
    threads_before = _engine_threads()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        children = _children() - children_before
        segments = _own_segments() - segments_before
        threads = _engine_threads() - threads_before
        if not (children or segments or threads) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    problems = []
    if children:
        problems.append(f"child processes still alive: {sorted(children)}")
        import psutil

        for pid in children:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
    if segments:
        problems.append(f"shared-memory segments left in /dev/shm: {sorted(segments)}")
        for name in segments:
            with contextlib.suppress(OSError):
                (SHM_DIR / name).unlink()
    if threads:
        problems.append(f"engine threads still running: {sorted(threads)}")
    if problems:
        pytest.fail("leak check: " + "; ".join(problems))
