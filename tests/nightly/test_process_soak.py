"""Nightly: soak and stress of the processes strategy (marked ``nightly``).

FAULTS.md #23 (1,000 executors created and closed: constant descriptors,
threads and segments), the crash matrix repeated on one executor, a 512 MiB
result, repeated caller SIGKILLs, and a long mixed soak. Run by
``ci/nightly_spawn.sh`` under fork, spawn and forkserver
(``CE_TEST_START_METHODS``); ``CE_NIGHTLY_EXECUTORS`` shortens the loop.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from _crash_tasks import (
    array_checksum,
    big_array,
    exit_on,
    identity,
    raise_on,
    segfault_on,
    sigkill_on,
    start_methods,
)

from engine import ParallelConfig, ParallelExecutor, WorkerCrashedError

pytestmark = [
    pytest.mark.nightly,
    pytest.mark.spawn,
    pytest.mark.skipif(
        not os.path.isdir("/dev/shm") or os.name != "posix",
        reason="counts /dev/shm segments and sends POSIX signals",
    ),
]

METHODS = start_methods()


def _config(start_method: str, **more: Any) -> ParallelConfig:
    fields: dict[str, Any] = {
        "strategy": "processes",
        "max_workers": 2,
        "start_method": start_method,
        "min_batch_size": 1,
    }
    return ParallelConfig(**{**fields, **more})


def _census() -> tuple[int, int, int]:
    me = psutil.Process()
    prefix = f"cepe_{np.base_repr(os.getpid(), 36).lower()}_"
    segments = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    return me.num_fds(), threading.active_count(), len(segments)


@pytest.mark.parametrize("start_method", METHODS)
def test_thousand_executors_leak_nothing(start_method: str) -> None:
    count = int(os.environ.get("CE_NIGHTLY_EXECUTORS", "1000"))
    data = np.ones(200_000)
    for _ in range(3):  # warm-up: lazy imports, the resource tracker
        with ParallelExecutor(_config(start_method, max_workers=1)) as ex:
            ex.map(array_checksum, range(2), data)
    before = _census()
    for _ in range(count):
        with ParallelExecutor(_config(start_method, max_workers=1)) as ex:
            assert (
                ex.map(array_checksum, range(2), ex.share(data)) == [(1.0, False)] * 2
            )
    deadline = time.monotonic() + 5
    while _census() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _census() == before  # descriptors, threads, segments


@pytest.mark.parametrize("start_method", METHODS)
def test_crash_matrix_repeated_on_one_executor(start_method: str) -> None:
    faults = [
        (segfault_on, WorkerCrashedError),
        (exit_on, WorkerCrashedError),
        (sigkill_on, WorkerCrashedError),
        (raise_on, KeyError),
    ]
    with ParallelExecutor(_config(start_method)) as ex:
        for _ in range(10):
            for fn, error in faults:
                with pytest.raises(error):
                    ex.map(fn, range(8), chunk_size=1)
                assert ex.map(identity, range(40), chunk_size=3) == list(range(40))


@pytest.mark.parametrize("start_method", METHODS)
def test_half_gigabyte_result(start_method: str) -> None:
    n_bytes = 512 * 1024 * 1024
    with ParallelExecutor(_config(start_method, max_workers=1)) as ex:
        (result,) = ex.map(big_array, [n_bytes], chunk_size=1)
    assert result.nbytes == n_bytes
    assert float(result[0]) == float(result[-1]) == 7.0


@pytest.mark.parametrize("start_method", METHODS)
def test_mixed_soak(start_method: str) -> None:
    rng = random.Random(0)
    with ParallelExecutor(_config(start_method, worker_max_tasks=50)) as ex:
        for _ in range(200):
            n = rng.randint(0, 300)
            choice = rng.random()
            if choice < 0.1:
                with pytest.raises(WorkerCrashedError):
                    ex.map(exit_on, range(max(n, 8)), chunk_size=1)
            elif choice < 0.2:
                with pytest.raises(KeyError):
                    ex.map(raise_on, range(max(n, 8)), chunk_size=2)
            else:
                size = rng.choice([None, 1, 7])
                assert ex.map(identity, range(n), chunk_size=size) == list(range(n))


CALLER = """
import json, sys
import numpy as np, psutil
from engine import ParallelConfig, ParallelExecutor
from _crash_tasks import array_checksum, sleep_then
if __name__ == "__main__":
    with ParallelExecutor(ParallelConfig(strategy="processes", max_workers=2,
                          start_method=sys.argv[1], min_batch_size=1)) as ex:
        ex.map(array_checksum, range(2), ex.share(np.ones(300_000)))
        print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
        ex.map(sleep_then, range(100), 1.0, chunk_size=1)
"""


@pytest.mark.parametrize("start_method", METHODS)
def test_caller_sigkill_repeated(start_method: str) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
    }
    for _ in range(10):
        caller = subprocess.Popen(
            [sys.executable, "-c", CALLER, start_method],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert caller.stdout is not None
        pids = json.loads(caller.stdout.readline())
        prefix = f"cepe_{np.base_repr(caller.pid, 36).lower()}_"
        os.kill(caller.pid, signal.SIGKILL)
        caller.wait()
        caller.stdout.close()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            alive = [
                p
                for p in pids
                if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            ]
            left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
            if not alive and not left:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"left behind: {alive} {left}")
