"""Crash helpers for the process tests: real signals, real exits, real segfaults.

Importable by spawn and forkserver workers (tests/ is on their sys.path). The
objects follow loky's crash tests: each misbehaves at one moment of a task's
trip — pickled in the caller, unpickled in a worker, returned, or unpickled
back in the caller.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any


def segfault() -> None:
    """Dereference NULL: a real SIGSEGV, not a simulated one."""
    ctypes.string_at(0)


def _in_worker() -> bool:
    from engine import _state

    return _state.is_nested() or _state._process_is_worker


def _exit_now(code: int) -> None:
    os._exit(code)


def _raise_value_error(message: str) -> None:
    raise ValueError(message)


def _fail_outside_worker(message: str) -> Any:
    if not _in_worker():
        raise RuntimeError(message)
    return message


# -- objects that misbehave when pickled or unpickled ----------------------------------


class CrashAtUnpickle:
    """Segfaults the process that unpickles it (a worker)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return segfault, ()


class ExitAtUnpickle:
    """Calls ``os._exit(9)`` in the process that unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _exit_now, (9,)


class ErrorAtUnpickle:
    """Raises ValueError in the process that unpickles it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _raise_value_error, ("cannot unpickle ErrorAtUnpickle",)


class ErrorAtPickle:
    """Raises ValueError when pickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        msg = "ErrorAtPickle refuses to be pickled"
        raise ValueError(msg)


class ExitAtPickle:
    """Calls ``os._exit(8)`` when pickled (as a result: in the worker)."""

    def __reduce__(self) -> tuple[Any, ...]:
        os._exit(8)


class ErrorInCaller:
    """Unpickles in workers, raises RuntimeError when unpickled in the caller."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _fail_outside_worker, (
            "ErrorInCaller cannot be unpickled in the caller",
        )


# -- task functions ---------------------------------------------------------------------


def identity(x: Any) -> Any:
    return x


def ignore_arg(x: Any, _: Any) -> Any:
    return x


def segfault_on(x: int, target: int = 3) -> int:
    if x == target:
        segfault()
    return x


def exit_on(x: int, target: int = 3, code: int = 7) -> int:
    if x == target:
        os._exit(code)
    return x


def sigkill_on(x: int, target: int = 3) -> int:
    if x == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def raise_on(x: int, target: int = 3) -> int:
    if x == target:
        msg = f"task {x} failed on purpose"
        raise KeyError(msg)
    return x


def return_instance(x: int, cls_name: str, target: int = 3) -> Any:
    if x == target:
        return globals()[cls_name]()
    return x


def return_lock(x: int, target: int = 3) -> Any:
    return threading.Lock() if x == target else x


def sleep_then(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x


def stuck_in_c(x: int, seconds: float = 60.0) -> int:
    """One long sleep: never reaches the cooperative cancel check."""
    time.sleep(seconds)
    return x


def report_pid_then_sleep(x: int, directory: str, seconds: float = 30.0) -> int:
    """Write this worker's pid to ``directory/<x>.pid`` then sleep."""
    path = Path(directory) / f"{x}.pid"
    partial = path.with_suffix(".tmp")
    partial.write_text(str(os.getpid()))
    partial.replace(path)  # atomic: a reader never sees an empty file
    time.sleep(seconds)
    return x


def pid_after(x: int, seconds: float = 0.0) -> int:
    if seconds:
        time.sleep(seconds)
    return os.getpid()


def clock_after(x: int, seconds: float = 0.0) -> float:
    """The wall clock when this item started (comparable across processes)."""
    started = time.time()
    if seconds:
        time.sleep(seconds)
    return started


def mapped_segments(_: Any) -> list[str]:
    """The engine's shared-memory segments this process maps (Linux)."""
    with open("/proc/self/maps") as maps:
        return sorted(
            {
                line.split("/dev/shm/", 1)[1].strip()
                for line in maps
                if "/dev/shm/cepe_" in line
            }
        )


def environment_of(_: Any, names: tuple[str, ...]) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in names}


def big_array(n_bytes: int) -> Any:
    import numpy as np

    return np.full(n_bytes // 8, 7.0)


def array_checksum(x: int, array: Any) -> tuple[float, bool]:
    return float(array[x]), bool(array.flags.writeable)


def numba_double(x: int) -> float:
    from numba import njit

    return float(_double_kernel(njit)(float(x)))


_KERNELS: dict[str, Any] = {}


def _double_kernel(njit: Any) -> Any:
    kernel = _KERNELS.get("double")
    if kernel is None:
        kernel = _KERNELS["double"] = njit(cache=False, nogil=True)(lambda v: v * 2.0)
    return kernel


def start_methods(default: str = "fork,spawn") -> list[str]:
    """Start methods to test: ``CE_TEST_START_METHODS`` (ci/nightly_spawn.sh) or fork+spawn.

    Methods this platform lacks are dropped (Windows: spawn only).
    """
    import multiprocessing

    wanted = os.environ.get("CE_TEST_START_METHODS", default).split(",")
    available = multiprocessing.get_all_start_methods()
    return [method for method in wanted if method.strip() in available]
