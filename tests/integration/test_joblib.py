"""The joblib strategy beyond the shared suite: crashes, forced cancel, payloads, nesting.

Real loky workers, real SIGKILL and ``os._exit``; the behavioural suite
(test_behaviour.py) covers map, order, errors, cancel and timeout.
"""

from __future__ import annotations

import functools
import os
import pickle
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("joblib")

from _tasks import (
    array_sum,
    bad_result_at,
    exit_in_worker,
    fail_on,
    identity,
    joblib_inside,
    kill_in_worker,
    nested_map,
    pid_and_id,
    sleep_in_worker,
    sleep_s,
    square,
    unpicklable_result_at,
)

from engine import (
    CancelledError,
    ConfigError,
    FallbackWarning,
    ParallelConfig,
    ParallelExecutor,
    RunTimeoutError,
    WorkerCrashedError,
)
from engine._context import thread_cap

FIELDS: dict[str, Any] = {"strategy": "joblib", "max_workers": 2, "min_batch_size": 1}


def _executor(**more: Any) -> ParallelExecutor:
    return ParallelExecutor(ParallelConfig(**{**FIELDS, **more}))


@pytest.fixture(scope="module")
def warm() -> Iterator[ParallelExecutor]:
    """One executor for the tests that never kill a worker (saves start-ups).

    Its workers start before each test's leak-check snapshot and end at
    module teardown; tests that crash or kill workers use their own.
    """
    with _executor() as ex:
        ex.map(square, range(4))
        yield ex


def test_sigkilled_worker_raises_worker_crashed_and_pool_heals() -> None:
    fn = functools.partial(kill_in_worker, caller_pid=os.getpid(), target=9)
    with _executor() as ex:
        ex.map(square, range(4))  # warm: time the crash, not the start-up
        started = time.monotonic()
        with pytest.raises(WorkerCrashedError) as info:
            ex.map(fn, range(40), chunk_size=4)
        assert time.monotonic() - started < 1.5
        error = info.value
        assert error.chunk_index is not None
        assert error.chunk_index <= 2
        assert error.signal_name == "SIGKILL"
        assert error.exitcode == -9
        assert "force_serial" in str(error)
        assert ex.map(square, range(30)) == [square(i) for i in range(30)]
        summary = ex.telemetry.summary()
    assert summary["failures"] == 1
    assert summary["worker_restarts"] >= 2
    assert [run["status"] for run in summary["runs"]] == ["ok", "error", "ok"]


def test_worker_os_exit_reports_exit_code() -> None:
    fn = functools.partial(exit_in_worker, caller_pid=os.getpid(), target=0)
    with _executor() as ex:
        with pytest.raises(WorkerCrashedError) as info:
            ex.map(fn, range(8), chunk_size=2)
        assert info.value.exitcode == 7
        assert ex.map(square, range(8)) == [square(i) for i in range(8)]


def test_force_serial_reruns_lost_chunks() -> None:
    fn = functools.partial(kill_in_worker, caller_pid=os.getpid(), target=9)
    with _executor(force_serial_on_failure=True) as ex:
        with pytest.warns(FallbackWarning, match="re-ran chunk"):
            assert ex.map(fn, range(40), chunk_size=4) == list(range(40))
        run = ex.telemetry.summary()["runs"][-1]
        assert ex.map(square, range(10)) == [square(i) for i in range(10)]
    assert run["status"] == "ok"
    assert run["failures"] >= 1
    assert run["fallbacks"]
    assert run["fallbacks"][0]["requested"] == "joblib"
    assert run["items"] == 40


def test_cancel_kills_a_stuck_chunk_after_the_grace_period() -> None:
    fn = functools.partial(sleep_in_worker, caller_pid=os.getpid(), seconds=30.0)
    with _executor(cancel_grace_s=0.3) as ex:
        ex.map(square, range(4))
        timer = threading.Timer(0.3, ex.cancel)
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(CancelledError):
                ex.map(fn, range(4), chunk_size=1)
        finally:
            timer.cancel()
        assert time.monotonic() - started < 0.3 + 0.3 + 1.0
        assert ex.map(square, range(10)) == [square(i) for i in range(10)]
        runs = ex.telemetry.summary()["runs"]
    assert runs[1]["status"] == "cancelled"
    assert runs[1]["worker_restarts"] >= 2


def test_cancel_stops_running_chunks_at_their_next_item() -> None:
    fn = functools.partial(sleep_s, seconds=0.05)
    with _executor(cancel_grace_s=5.0) as ex:
        ex.map(square, range(4))
        timer = threading.Timer(0.3, ex.cancel)
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(CancelledError):
                ex.map(fn, range(240), chunk_size=60)  # 3 s chunks
        finally:
            timer.cancel()
        # The running chunks saw the cancel board, so no 5 s grace, no kill.
        assert time.monotonic() - started < 1.5
        assert ex.telemetry.summary()["runs"][-1]["worker_restarts"] == 0


def test_timeout_with_stuck_chunks_names_the_limit() -> None:
    # Chunks that never reach an item boundary: the map still ends in time and
    # the executor's exit kills them (the leak check). Whether they started
    # (and were killed, as in the cancel test) depends on how fast loky starts.
    fn = functools.partial(sleep_in_worker, caller_pid=os.getpid(), seconds=30.0)
    with _executor(timeout_s=0.5, cancel_grace_s=0.2) as ex:
        started = time.monotonic()
        with pytest.raises(RunTimeoutError, match=r"timeout_s=0\.5"):
            ex.map(fn, range(4), chunk_size=1)
        assert time.monotonic() - started < 0.5 + 0.2 + 1.5
        assert ex.telemetry.summary()["runs"][-1]["status"] == "timeout"


def test_unpicklable_argument_is_named_before_dispatch(warm: ParallelExecutor) -> None:
    with pytest.raises(pickle.PicklingError, match=r"extra argument #1 \(lock\)"):
        warm.map(pid_and_id, range(4), 1, threading.Lock())
    assert warm.telemetry.summary()["runs"][-1]["chunks"] == 0
    with pytest.raises(pickle.PicklingError, match=r"item 4 \(lock\)"):
        warm.map(identity, [0, 1, 2, 3, threading.Lock()], chunk_size=2)
    assert warm.map(square, range(6)) == [square(i) for i in range(6)]


def test_unpicklable_result_names_the_item(warm: ParallelExecutor) -> None:
    with pytest.raises(pickle.PicklingError, match="item 5"):
        warm.map(unpicklable_result_at, range(10), chunk_size=3)
    assert warm.map(square, range(6)) == [square(i) for i in range(6)]


def test_result_that_fails_to_unpickle_names_the_item(warm: ParallelExecutor) -> None:
    with pytest.raises(pickle.UnpicklingError, match="item 5") as info:
        warm.map(bad_result_at, range(10), chunk_size=3)
    assert "cannot be unpickled" in str(info.value.__cause__)
    assert warm.map(square, range(6)) == [square(i) for i in range(6)]


def test_remote_traceback_is_the_cause(warm: ParallelExecutor) -> None:
    with pytest.raises(ValueError, match="item 13") as info:
        warm.map(fail_on, range(20))
    assert "fail_on" in str(info.value.__cause__)


def test_big_closure_array_crosses_as_a_handle_once_per_executor() -> None:
    big = np.arange(1_000_000, dtype=np.float64)  # 8 MB, above the 1 MiB threshold
    fn = functools.partial(array_sum, array=big)
    expected = [array_sum(i, big) for i in range(16)]
    with _executor() as ex:
        assert ex.map(fn, range(16), chunk_size=4) == expected
        assert ex.map(fn, range(16), chunk_size=4) == expected
        first, second = ex.telemetry.summary()["runs"]
    assert first["bytes_shared"] == big.nbytes
    assert second["bytes_shared"] == 0
    # 4 chunks, each carrying the task and its items: handles, not 8 MB copies.
    assert first["bytes_pickled"] < 4 * 10_000


def test_shared_object_is_unpickled_once_per_worker() -> None:
    model = {"weights": list(range(1000))}
    with _executor() as ex:  # its own: the segment must end with the test
        handle = ex.share(model)
        pairs = ex.map(pid_and_id, range(40), handle, chunk_size=2)
        pairs += ex.map(pid_and_id, range(40), handle, chunk_size=2)
    ids_by_pid: dict[int, set[int]] = {}
    for pid, ident in pairs:
        ids_by_pid.setdefault(pid, set()).add(ident)
    assert all(len(ids) == 1 for ids in ids_by_pid.values())


def test_joblib_inside_a_worker_uses_threads(warm: ParallelExecutor) -> None:
    results = warm.map(joblib_inside, range(4))
    assert results == [
        (sum(square(i) for i in range(x + 4)), "ThreadingBackend") for x in range(4)
    ]


def test_engine_inside_a_user_joblib_worker_does_not_hang() -> None:
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    inner = {**FIELDS, "max_workers": 1}
    try:
        results = Parallel(n_jobs=2, timeout=60)(
            delayed(nested_map)(x, inner) for x in range(2)
        )
    finally:
        # joblib keeps its reusable pool alive for later calls: end it here.
        get_reusable_executor().shutdown(wait=True, kill_workers=True)
    assert [total for total, _, _ in results] == [
        sum(square(i) for i in range(x + 8)) for x in range(2)
    ]
    assert all(strategy in ("joblib", "serial") for _, strategy, _ in results)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_unsupported_start_method_is_refused_before_start(start_method: str) -> None:
    with pytest.raises(ConfigError, match=f"start_method='{start_method}'"):
        _executor(start_method=start_method).__enter__()


def test_telemetry_names_loky_and_the_thread_cap() -> None:
    with _executor(start_method="spawn") as ex:
        ex.map(square, range(40), chunk_size=10)
        run = ex.telemetry.summary()["runs"][0]
    assert run["strategy"] == "joblib"
    assert run["start_method"] == "loky"
    assert run["thread_cap"] == thread_cap(2)
    assert run["chunks"] == 4
    assert run["bytes_pickled"] > 0
    assert run["compute_s"] >= 0.0


def test_no_memmapping_folder_is_created(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("JOBLIB_TEMP_FOLDER", str(tmp_path))
    big = np.ones(500_000)
    with _executor() as ex, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ex.map(array_sum, range(8), big) == [array_sum(i, big) for i in range(8)]
    assert list(tmp_path.iterdir()) == []
