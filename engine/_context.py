"""Process context: CPU count, start methods, worker environment, checks.

``usable_cpu_count`` is affinity and cgroup-quota aware. The rest serves the
processes strategy (DESIGN.md section 4): which start method workers use
(``resolve_start_method``), the thread caps a worker sets before it imports
numpy (``worker_environment``, FAULTS.md #13), and whether this environment
can run worker processes at all (``process_support_problem``).
"""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path

from engine import _env
from engine.errors import ConfigError

_CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_cpu_limit() -> float | None:
    """Return the cgroup CPU quota in CPUs, or ``None`` when unlimited."""
    try:
        if _CGROUP_V2_CPU_MAX.exists():
            quota, period = _CGROUP_V2_CPU_MAX.read_text().split()[:2]
            if quota == "max":
                return None
            return int(quota) / int(period)
        if _CGROUP_V1_QUOTA.exists():
            quota_us = int(_CGROUP_V1_QUOTA.read_text())
            period_us = int(_CGROUP_V1_PERIOD.read_text())
            if quota_us <= 0 or period_us <= 0:
                return None
            return quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


# (pid, count): reading cgroup files costs ~0.1 ms and auto asks on every run;
# the pid check recomputes it in a forked child, whose affinity may differ.
_CPU_CACHE: list[tuple[int, int]] = []


def usable_cpu_count() -> int:
    """Return the CPUs this process may use: affinity, then cgroup quota."""
    pid = os.getpid()
    if _CPU_CACHE and _CPU_CACHE[0][0] == pid:
        return _CPU_CACHE[0][1]
    count = _measure_cpu_count()
    _CPU_CACHE[:] = [(pid, count)]
    return count


def _measure_cpu_count() -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.floor(limit)))
    return max(1, count)


def thread_cap(workers: int) -> int:
    """Return BLAS/OpenMP/numba threads per worker: ``max(1, cpus // workers)``."""
    return max(1, usable_cpu_count() // max(1, workers))


# -- start methods -------------------------------------------------------------

# Where workers may be forked, they are: the supervisor that forks them is a
# fresh, single-threaded process that never imported numpy, so fork is safe
# there (FAULTS.md #12) and a replacement costs milliseconds instead of the
# 0.6-0.9 s of a spawn with numpy and numba (SUPERVISOR-NOTES.md). Windows
# has no fork. macOS lists fork; the usual macOS hazard (forking a process
# that initialised system frameworks) does not apply to the bare supervisor.
_WINDOWS = sys.platform == "win32"


def available_start_methods() -> tuple[str, ...]:
    """Return the start methods this platform offers, in multiprocessing's order."""
    import multiprocessing

    return tuple(multiprocessing.get_all_start_methods())


def default_start_method() -> str:
    """Return the platform's safe default for workers: fork, else spawn."""
    return "fork" if "fork" in available_start_methods() and not _WINDOWS else "spawn"


def resolve_start_method(requested: str | None) -> str:
    """Return the start method workers will use.

    Parameters
    ----------
    requested : str or None
        ``"fork"``, ``"spawn"``, ``"forkserver"``, or ``None`` for the
        platform's safe default (``default_start_method``).

    Raises
    ------
    ConfigError
        The method is unknown or not available on this platform.
    """
    if requested is None:
        return default_start_method()
    available = available_start_methods()
    if requested not in available:
        msg = (
            f"ParallelConfig.start_method={requested!r} is not available on this "
            f"platform ({sys.platform}); allowed here: {' | '.join(available)} "
            "| None (the platform's safe default)."
        )
        raise ConfigError(msg)
    return requested


def worker_environment(workers: int) -> dict[str, str]:
    """Return the variables a worker sets before it imports numpy.

    Each of ``workers`` processes gets ``thread_cap(workers)`` BLAS, OpenMP
    and numba threads, so N workers do not oversubscribe the CPUs
    (FAULTS.md #13, #14).
    """
    return _env.worker_environment(thread_cap(workers))


# -- can this environment run worker processes? --------------------------------

# Module-level so tests can point it at a missing directory.
SHM_DIR = "/dev/shm"


def process_support_problem() -> str | None:
    """Return why worker processes cannot run here, or ``None`` if they can.

    Checks what the processes strategy needs before anything starts: an
    interpreter to launch (frozen or embedded Pythons may have none), local
    sockets, and on Linux a writable ``/dev/shm`` for shared payloads (AWS
    Lambda has none).
    """
    # The supervisor is a fresh interpreter (engine.supervisor): without an
    # executable to launch there is no pool at all.
    executable = sys.executable
    if not executable or not os.path.exists(executable):
        return (
            f"sys.executable={executable!r} is not an interpreter this process can "
            "launch (a frozen or embedded Python)"
        )
    import socket

    family = getattr(socket, "AF_UNIX", None) if not _WINDOWS else socket.AF_INET
    if family is None:
        return "this platform has no AF_UNIX sockets for the worker connections"
    # Linux only: macOS has no /dev/shm directory (its segments live in the
    # kernel), Windows uses named file mappings.
    if sys.platform.startswith("linux"):
        shm = Path(SHM_DIR)
        if not shm.is_dir() or not os.access(shm, os.W_OK | os.X_OK):
            return (
                f"{SHM_DIR} is missing or not writable, so shared-memory payloads "
                "cannot be created (as on AWS Lambda)"
            )
    return None


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Python's version, then each named package's ``__version__``.

    ``None`` for a package that is not installed, ``"unknown"`` for one
    without a ``__version__``. For reports (``engine info``, the benches).
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            module = __import__(name)
        except ImportError:
            out[name] = None
        else:
            out[name] = getattr(module, "__version__", "unknown")
    return out
