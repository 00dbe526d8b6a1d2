"""The dask strategy beyond the shared suite: scattering, lost workers, real clusters.

Real Dask, no mocks: a module-scoped ``LocalCluster`` driven by address for
the quick tests, clusters the strategy starts and owns for the crash and
forced-cancel tests, and ``dask scheduler`` / ``dask worker`` subprocesses
for the command-line set-up of docs/scaling-out.md.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _tasks import (
    array_sum,
    bad_result_at,
    fail_on,
    identity,
    kill_in_worker,
    pid_and_id,
    pid_of,
    sleep_in_worker,
    sleep_s,
    square,
    unpicklable_result_at,
)

from engine import (
    CancelledError,
    FallbackWarning,
    ParallelConfig,
    ParallelExecutor,
    StrategyUnavailableError,
    WorkerCrashedError,
)
from engine._context import thread_cap

# Skip cleanly only when the extra is missing (pip install ...[dask]).
distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
OWNED: dict[str, Any] = {"strategy": "dask", "max_workers": 2, "min_batch_size": 1}


@pytest.fixture(scope="module")
def cluster_address() -> Iterator[str]:
    """A 2-worker LocalCluster the tests reach by address (not owned by them).

    Its processes start before each test's leak-check snapshot and end at
    module teardown.
    """
    # As docs/scaling-out.md advises: keep broadcast replicas (no AMM).
    amm_off = {"distributed.scheduler.active-memory-manager.start": False}
    with (
        dask.config.set(amm_off),
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address=":0",  # None would still bind port 8787
            silence_logs=logging.ERROR,
        ) as cluster,
    ):
        yield cluster.scheduler_address


def _remote(address: str, **more: Any) -> ParallelExecutor:
    fields = {**OWNED, "dask_address": address, **more}
    return ParallelExecutor(ParallelConfig(**fields))


def _owned(**more: Any) -> ParallelExecutor:
    return ParallelExecutor(ParallelConfig(**{**OWNED, **more}))


# -- by address ---------------------------------------------------------------


def test_share_scatters_once_per_executor(cluster_address: str) -> None:
    data = np.arange(300_000, dtype=np.float64)
    expected = [array_sum(i, data) for i in range(10)]
    with _remote(cluster_address) as ex:
        handle = ex.share(data)
        assert ex.map(array_sum, range(10), handle, chunk_size=2) == expected
        assert ex.map(array_sum, range(10), handle, chunk_size=2) == expected
        first, second = ex.telemetry.summary()["runs"]
    assert first["bytes_shared"] == data.nbytes
    assert second["bytes_shared"] == 0
    assert first["bytes_pickled"] < 5 * 10_000  # handles, not 2.4 MB per chunk


def test_big_closure_array_is_scattered_not_pickled(cluster_address: str) -> None:
    big = np.arange(1_000_000, dtype=np.float64)
    fn = functools.partial(array_sum, array=big)
    with _remote(cluster_address) as ex:
        assert ex.map(fn, range(8), chunk_size=2) == [fn(i) for i in range(8)]
        run = ex.telemetry.summary()["runs"][0]
    assert run["bytes_shared"] == big.nbytes
    assert run["bytes_pickled"] < 4 * 10_000


def test_shared_object_is_deserialised_once_per_worker(cluster_address: str) -> None:
    model = {"weights": list(range(1000))}
    with _remote(cluster_address) as ex:
        handle = ex.share(model)
        pairs = ex.map(pid_and_id, range(40), handle, chunk_size=2)
        pairs += ex.map(pid_and_id, range(40), handle, chunk_size=2)
    ids_by_pid: dict[int, set[int]] = {}
    for pid, ident in pairs:
        ids_by_pid.setdefault(pid, set()).add(ident)
    assert len(ids_by_pid) == 2, ids_by_pid
    assert all(len(ids) == 1 for ids in ids_by_pid.values()), ids_by_pid


def test_fn_error_keeps_type_with_remote_traceback(cluster_address: str) -> None:
    with _remote(cluster_address) as ex:
        with pytest.raises(ValueError, match="item 13") as info:
            ex.map(fail_on, range(20), chunk_size=3)
        assert "fail_on" in str(info.value.__cause__)
        assert ex.map(square, range(6)) == [square(i) for i in range(6)]


def test_pickling_failures_are_named(cluster_address: str) -> None:
    with _remote(cluster_address) as ex:
        with pytest.raises(pickle.PicklingError, match=r"extra argument #1 \(lock\)"):
            ex.map(pid_and_id, range(4), 1, threading.Lock())
        with pytest.raises(pickle.PicklingError, match=r"item 4 \(lock\)"):
            ex.map(identity, [0, 1, 2, 3, threading.Lock()], chunk_size=2)
        with pytest.raises(pickle.PicklingError, match="item 5"):
            ex.map(unpicklable_result_at, range(10), chunk_size=3)
        with pytest.raises(pickle.UnpicklingError, match="item 5"):
            ex.map(bad_result_at, range(10), chunk_size=3)
        assert ex.map(square, range(6)) == [square(i) for i in range(6)]


def test_cancel_on_a_cluster_not_owned_is_cooperative(cluster_address: str) -> None:
    fn = functools.partial(sleep_s, seconds=0.05)
    with _remote(cluster_address, cancel_grace_s=0.2) as ex:
        timer = threading.Timer(0.3, ex.cancel)
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(CancelledError):
                ex.map(fn, range(400), chunk_size=60)  # 3 s chunks
        finally:
            timer.cancel()
        assert time.monotonic() - started < 1.3
        # Workers stopped the cancelled chunks at their next item, so the next
        # map does not wait for the rest of those 3 s chunks.
        started = time.monotonic()
        assert ex.map(square, range(6)) == [square(i) for i in range(6)]
        assert time.monotonic() - started < 1.5
        assert ex.telemetry.summary()["worker_restarts"] == 0


def test_ce_parallel_points_at_the_scheduler(
    cluster_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CE_PARALLEL", f"dask,dask={cluster_address},min_batch=1")
    with ParallelExecutor() as ex:
        assert ex.map(square, range(30)) == [square(i) for i in range(30)]
        run = ex.telemetry.summary()["runs"][0]
    assert run["strategy"] == "dask"
    assert run["start_method"] is None  # remote workers are not ours
    assert run["thread_cap"] is None


def test_unreachable_scheduler_names_the_address() -> None:
    with pytest.raises(StrategyUnavailableError, match=r"tcp://127\.0\.0\.1:9"):
        _remote("tcp://127.0.0.1:9", timeout_s=0.5).__enter__()


# -- clusters the strategy owns -----------------------------------------------


def test_owned_cluster_worker_killed_mid_map_fails_only_its_chunks() -> None:
    fn = functools.partial(sleep_in_worker, caller_pid=os.getpid(), seconds=0.4)
    with _owned() as ex:
        pids = set(ex.map(pid_of, range(40), chunk_size=1))
        assert len(pids) == 2
        victim = min(pids)
        killer = threading.Timer(0.5, os.kill, (victim, signal.SIGKILL))
        killer.start()
        try:
            with pytest.raises(WorkerCrashedError) as info:
                ex.map(fn, range(40), chunk_size=1)
        finally:
            killer.cancel()
        assert info.value.chunk_index is not None
        assert "force_serial" in str(info.value)
        # The nanny replaces the worker; the executor keeps working.
        assert ex.map(square, range(20)) == [square(i) for i in range(20)]
        summary = ex.telemetry.summary()
    assert summary["failures"] >= 1
    assert summary["start_method"] == "spawn"
    assert summary["runs"][0]["thread_cap"] == thread_cap(2)


def test_owned_cluster_force_serial_reruns_the_lost_chunk() -> None:
    fn = functools.partial(kill_in_worker, caller_pid=os.getpid(), target=5)
    with _owned(force_serial_on_failure=True) as ex:
        with pytest.warns(FallbackWarning, match=r"re-ran chunk \d+ serially"):
            assert ex.map(fn, range(20), chunk_size=4) == list(range(20))
        run = ex.telemetry.summary()["runs"][-1]
    assert run["status"] == "ok"
    # The dead worker also held the chunk queued behind chunk 1 (dask sends
    # a worker more than it runs): those fail with it, and re-run too.
    assert run["failures"] >= 1
    assert 1 in [fallback["chunk"] for fallback in run["fallbacks"]]
    assert run["items"] == 20


def test_owned_cluster_stuck_chunk_is_killed_after_the_grace_period() -> None:
    fn = functools.partial(sleep_in_worker, caller_pid=os.getpid(), seconds=30.0)
    with _owned(cancel_grace_s=0.3) as ex:
        ex.map(square, range(4))
        timer = threading.Timer(0.3, ex.cancel)
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(CancelledError):
                ex.map(fn, range(2), chunk_size=1)
        finally:
            timer.cancel()
        assert time.monotonic() - started < 0.3 + 0.3 + 1.5
        assert ex.map(square, range(6)) == [square(i) for i in range(6)]
        runs = ex.telemetry.summary()["runs"]
    assert runs[1]["status"] == "cancelled"
    assert runs[1]["worker_restarts"] >= 1


# -- dask scheduler and dask worker on the command line -----------------------


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    env.pop("CE_PARALLEL", None)
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # workers close their nanny's child
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def cli_cluster(tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` and two ``dask worker`` subprocesses on random ports."""
    scheduler_file = tmp_path / "scheduler.json"
    common = ["--dashboard-address", ":0", "--host", "127.0.0.1"]  # no fixed ports
    scheduler = _spawn(
        [
            "distributed.cli.dask_scheduler",
            "--port",
            "0",
            "--scheduler-file",
            str(scheduler_file),
            *common,
        ],
        tmp_path / "scheduler.log",
    )
    processes = [scheduler]
    try:
        deadline = time.monotonic() + 30
        address = None
        while address is None:
            assert scheduler.poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.05)
            try:  # the file appears before it is completely written
                address = json.loads(scheduler_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                address = None
        for index in range(2):
            processes.append(
                _spawn(
                    [
                        "distributed.cli.dask_worker",
                        "--scheduler-file",
                        str(scheduler_file),
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        *common,
                    ],
                    tmp_path / f"worker{index}.log",
                )
            )
        with distributed.Client(address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        _stop(processes[1:])
        _stop(processes[:1])


def test_command_line_scheduler_and_two_workers(cli_cluster: str) -> None:
    big = np.arange(500_000, dtype=np.float64)
    with _remote(cli_cluster) as ex:
        handle = ex.share(big)
        assert ex.map(array_sum, range(30), handle, chunk_size=3) == [
            array_sum(i, big) for i in range(30)
        ]
        assert len(set(ex.map(pid_of, range(40), chunk_size=1))) == 2
        summary = ex.telemetry.summary()
    assert summary["strategy"] == "dask"
    assert summary["bytes_shared"] == big.nbytes


def test_unguarded_main_module_gets_the_remedy(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from engine import ParallelExecutor\n"
        "with ParallelExecutor(strategy='dask', max_workers=1) as ex:\n"
        "    print(ex.map(abs, [-1, -2]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    env.pop("CE_PARALLEL", None)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    assert "StrategyUnavailableError" in done.stderr
    assert 'if __name__ == "__main__":' in done.stderr
