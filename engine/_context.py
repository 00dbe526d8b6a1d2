"""Process context: usable CPU count (affinity and cgroup quota aware).

The supervisor work (issue 4) adds start-method resolution and the worker
environment (BLAS/OpenMP/numba thread caps) here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

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
