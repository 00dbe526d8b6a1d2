"""Importable task functions for the tests (spawn children import them)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any


def square(x: int) -> int:
    return x * x


def add(x: int, y: int) -> int:
    return x + y


def identity(x: Any) -> Any:
    return x


def shuffled_sleep(x: int, seed: int = 0) -> int:
    """Sleep a pseudo-random few milliseconds, so chunks finish out of order."""
    time.sleep(random.Random(seed * 100003 + x).random() * 0.004)
    return x * 3 + 1


class TaskError(ValueError):
    """A user-defined error type raised by a task."""


def fail_on(x: int, bad: int = 13) -> int:
    if x == bad:
        msg = f"item {x} is bad"
        raise TaskError(msg)
    return x


def pid_unless(x: int, bad: int, seconds: float) -> int:
    """Sleep ``seconds``; return the pid, or raise ``TaskError`` for ``bad``."""
    time.sleep(seconds)
    if x == bad:
        msg = f"item {x} is bad"
        raise TaskError(msg)
    return os.getpid()


def slower_in_workers(x: int, caller_pid: int, seconds: float) -> int:
    """Sleep ``seconds`` in the caller, four times as long anywhere else."""
    time.sleep(seconds if os.getpid() == caller_pid else 4 * seconds)
    return x


def sleep_s(x: int, seconds: float = 0.05) -> int:
    time.sleep(seconds)
    return x


def block_until(x: int, event: threading.Event) -> int:
    """Block (threads/serial only) until the event is set or 30 s pass."""
    event.wait(30)
    return x


def nested_map(x: int, fields: dict[str, Any]) -> tuple[int, str, bool]:
    """Run an executor inside a worker; report its strategy and nesting."""
    from engine import ParallelConfig, ParallelExecutor

    with ParallelExecutor(ParallelConfig(**fields)) as inner:
        values = inner.map(square, range(x + 8))
        summary = inner.telemetry.summary()
    return sum(values), summary["strategy"], summary["nested"]


def array_sum(x: int, array: Any) -> float:
    return float(array[x % len(array)]) + float(array.sum())


def pid_of(_: Any) -> int:
    return os.getpid()


def kill_self(x: int, target: int = 3) -> int:
    if x == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def exit_self(x: int, target: int = 3) -> int:
    if x == target:
        os._exit(7)
    return x


# -- joblib and dask strategy tests (tests/integration/test_joblib.py, test_dask.py)


def kill_in_worker(x: int, caller_pid: int, target: int = 3) -> int:
    """SIGKILL the worker at item ``target``; a no-op in the caller (serial re-run)."""
    if x == target and os.getpid() != caller_pid:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def exit_in_worker(x: int, caller_pid: int, target: int = 3) -> int:
    """``os._exit(7)`` in the worker at item ``target``; a no-op in the caller."""
    if x == target and os.getpid() != caller_pid:
        os._exit(7)
    return x


def sleep_in_worker(x: int, caller_pid: int, seconds: float = 30.0) -> int:
    """Sleep ``seconds`` in one call (no cooperative check) unless in the caller."""
    if os.getpid() != caller_pid:
        time.sleep(seconds)
    return x


def _refuse_rebuild() -> None:
    msg = "RebuildFails objects cannot be unpickled"
    raise ValueError(msg)


class RebuildFails:
    """Pickles fine; unpickling it raises (a result the caller cannot load)."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_refuse_rebuild, ())


def bad_result_at(x: int, target: int = 5) -> Any:
    return RebuildFails() if x == target else x


def unpicklable_result_at(x: int, target: int = 5) -> Any:
    return threading.Lock() if x == target else x


def joblib_inside(x: int) -> tuple[int, str]:
    """Run joblib.Parallel inside a worker; report its sum and backend."""
    from joblib import Parallel, delayed
    from joblib.parallel import get_active_backend

    backend = type(get_active_backend()[0]).__name__
    values = Parallel(n_jobs=2)(delayed(square)(i) for i in range(x + 4))
    return sum(values), backend


def pid_and_id(_: Any, obj: Any) -> tuple[int, int]:
    """The worker's pid and the identity of ``obj`` there."""
    return os.getpid(), id(obj)
