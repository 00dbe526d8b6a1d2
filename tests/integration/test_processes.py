"""The processes strategy beyond the shared behavioural suite (fork, fast).

Warm pool and recycling, thread caps, the bare supervisor, payloads through
shared memory, back-pressure, concurrent maps, configuration and environment
errors, and the pickling errors named before anything is dispatched.
"""

from __future__ import annotations

import os
import pickle
import sys
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
    clock_after,
    environment_of,
    identity,
    mapped_segments,
    numba_double,
    pid_after,
    sleep_then,
)
from _tasks import array_sum

from engine import (
    BrokenExecutorError,
    ConfigError,
    FallbackWarning,
    ParallelConfig,
    ParallelExecutor,
    StrategyUnavailableError,
    _context,
)
from engine.strategies import _dispatch

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="these tests fork; the spawn suite covers Windows"
)
LINUX_ONLY = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="/proc and /dev/shm are Linux's"
)

THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)


def _config(**more: Any) -> ParallelConfig:
    fields: dict[str, Any] = {
        "strategy": "processes",
        "max_workers": 2,
        "start_method": "fork",
        "min_batch_size": 1,
    }
    return ParallelConfig(**{**fields, **more})


def _supervisor() -> psutil.Process:
    for child in psutil.Process().children():
        if any("_supervisor_main" in part for part in child.cmdline()):
            return child
    pytest.fail("no supervisor process found")


def test_pool_stays_warm_across_maps() -> None:
    with ParallelExecutor(_config()) as ex:
        first = set(ex.map(pid_after, range(16), 0.01, chunk_size=1))
        for _ in range(3):
            assert set(ex.map(pid_after, range(16), 0.01, chunk_size=1)) == first
        assert len(first) == 2
        assert os.getpid() not in first


def test_shutdown_right_after_a_map_does_not_wait_for_an_idle_tick(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The background thread parks for up to IDLE_TICK_S after a map; a
    # shutdown must not wait that out (it did: 0.5 s per executor). With the
    # tick at 60 s, waiting it out would hit the join timeout (5 s) instead.
    monkeypatch.setattr(_dispatch, "IDLE_TICK_S", 60.0)
    ex = ParallelExecutor(_config()).__enter__()
    try:
        assert len(ex.map(pid_after, range(4), 0.0)) == 4
    finally:
        started = time.monotonic()
        ex.shutdown()
        took = time.monotonic() - started
    assert took < 3.0, f"shutdown took {took:.2f} s"


def test_worker_max_tasks_recycles_workers() -> None:
    with ParallelExecutor(_config(worker_max_tasks=3)) as ex:
        pids = ex.map(pid_after, range(24), chunk_size=1)
        # 24 chunks, at most 3 per worker process: at least 8 processes
        assert len(set(pids)) >= 8
        assert ex.map(identity, range(50), chunk_size=5) == list(range(50))
        assert ex.telemetry.summary()["worker_restarts"] >= 6


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_cap_blas_openmp_numba_threads(workers: int) -> None:
    cap = max(1, _context.usable_cpu_count() // workers)
    with ParallelExecutor(_config(max_workers=workers)) as ex:
        seen = ex.map(environment_of, range(4), THREAD_VARS, chunk_size=1)
        summary = ex.telemetry.summary()
    assert all(env == dict.fromkeys(THREAD_VARS, str(cap)) for env in seen)
    assert summary["runs"][-1]["thread_cap"] == cap


@LINUX_ONLY
def test_supervisor_is_single_threaded_and_never_imports_numpy() -> None:
    with ParallelExecutor(_config()) as ex:
        ex.map(identity, range(4))
        supervisor = _supervisor()
        assert supervisor.num_threads() == 1  # FAULTS.md #12
        maps = Path(f"/proc/{supervisor.pid}/maps").read_text()
        assert "numpy" not in maps  # so forked workers set their caps first
        assert len(supervisor.children()) == 2


def test_numba_kernel_runs_in_workers_after_the_caller_ran_it() -> None:
    # FAULTS.md #14: the workers are forked from the bare supervisor, never
    # from a caller that already initialised numba's threading layer.
    assert numba_double(4) == 8.0
    with ParallelExecutor(_config()) as ex:
        assert ex.map(numba_double, range(6), chunk_size=1) == [
            2.0 * i for i in range(6)
        ]


def test_shared_and_auto_shared_arrays_are_read_only_views() -> None:
    big = np.arange(400_000, dtype=np.float64)  # 3.2 MB: over the 1 MiB threshold
    with ParallelExecutor(_config()) as ex:
        handle = ex.share(big)
        assert ex.map(array_checksum, range(5), handle) == [
            (float(i), False) for i in range(5)
        ]
        # passed directly, the array still goes through shared memory
        assert ex.map(array_checksum, range(5), big) == [
            (float(i), False) for i in range(5)
        ]
        runs = ex.telemetry.summary()["runs"]
    assert runs[-1]["bytes_pickled"] < big.nbytes // 10


def test_huge_result_arrives_intact() -> None:
    # FAULTS.md #17 (the nightly suite sends 512 MiB)
    n_bytes = 128 * 1024 * 1024
    with ParallelExecutor(_config()) as ex:
        (result,) = ex.map(big_array, [n_bytes], chunk_size=1)
    assert result.nbytes == n_bytes
    assert float(result[0]) == 7.0
    assert float(result[-1]) == 7.0
    assert result.flags.writeable


def test_imap_holds_a_bounded_number_of_chunks() -> None:
    pulled = []

    def source() -> Any:
        for i in range(10_000):
            pulled.append(i)
            yield i

    with ParallelExecutor(_config()) as ex:
        stream = ex.imap(sleep_then, source(), 0.001, chunk_size=1)
        assert [next(stream) for _ in range(3)] == [0, 1, 2]
        time.sleep(0.3)  # the consumer pauses; the workers must not run ahead
        assert len(pulled) < 300
        stream.close()
        assert ex.map(identity, range(5)) == list(range(5))


def test_imap_starts_the_work_when_called() -> None:
    # As concurrent.futures' Executor.map submits at call time: the caller's
    # own work between imap() and the first next() overlaps the workers.
    with ParallelExecutor(_config()) as ex:
        assert ex.map(identity, range(4), chunk_size=1) == list(range(4))  # warm
        stream = ex.imap(clock_after, range(4), 0.0, chunk_size=1)
        time.sleep(0.5)
        consumed_at = time.time()
        started = list(stream)
    assert len(started) == 4
    assert min(started) < consumed_at - 0.3, (started, consumed_at)


def test_an_unconsumed_imap_is_cancelled_when_dropped() -> None:
    with ParallelExecutor(_config()) as ex:
        stream = ex.imap(sleep_then, range(200), 0.05, chunk_size=1)
        del stream  # started on the call; closing it cancels the rest
        began = time.monotonic()
        assert ex.map(identity, range(8), chunk_size=1) == list(range(8))
        assert time.monotonic() - began < 2.0


def _own_segments() -> list[str]:
    prefix = f"cepe_{np.base_repr(os.getpid(), 36).lower()}_"
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


@LINUX_ONLY
def test_arrays_shared_for_a_map_do_not_pile_up() -> None:
    # A warm executor fed a fresh large array per map (the CE plugin's
    # per-call tables) must not keep every one of them in /dev/shm.
    rng = np.random.default_rng(0)
    with ParallelExecutor(_config()) as ex:
        # The pool's own segment (the workers' progress board) stays.
        board = ex.map(mapped_segments, range(4), chunk_size=1)
        before = len(_own_segments())
        for _ in range(6):
            array = rng.random(300_000)  # 2.4 MB: over the 1 MiB threshold
            expected = [array_sum(x, array) for x in range(4)]
            assert ex.map(array_sum, range(4), array, chunk_size=1) == expected
            del array
        # The last array's segment goes at the next run or at close.
        assert len(_own_segments()) - before <= 1
        # Workers dropped their mappings when the runs were released.
        assert ex.map(mapped_segments, range(4), chunk_size=1) == board


@LINUX_ONLY
def test_an_array_kept_by_the_caller_is_shared_once_across_maps() -> None:
    array = np.arange(300_000, dtype=np.float64)
    with ParallelExecutor(_config()) as ex:
        ex.map(identity, range(2))
        pool_segments = len(_own_segments())  # the workers' progress board
        for _ in range(3):
            ex.map(array_sum, range(4), array, chunk_size=1)
        shared = [run.bytes_shared for run in ex.telemetry.runs]
        assert shared == [0, array.nbytes, 0, 0]
        handle = ex.share(array)  # now for the executor's life
        assert not handle.transient
        assert ex.map(array_sum, range(2), handle) == [
            array_sum(x, array) for x in range(2)
        ]
        del array
        ex.map(identity, range(4))
        # Kept: share() holds it until close.
        assert len(_own_segments()) == pool_segments + 1
    assert _own_segments() == []


def test_concurrent_maps_from_threads() -> None:
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    with ParallelExecutor(_config()) as ex:

        def work(seed: int) -> None:
            try:
                items = list(range(seed, seed + 300))
                results[seed] = ex.map(identity, items, chunk_size=1 + seed % 3)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [
            threading.Thread(target=work, args=(seed * 1000,)) for seed in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors
    assert results == {
        s * 1000: list(range(s * 1000, s * 1000 + 300)) for s in range(4)
    }


def test_telemetry_measures_the_work() -> None:
    with ParallelExecutor(_config()) as ex:
        ex.map(sleep_then, range(20), 0.005, chunk_size=2)
        run = ex.telemetry.summary()["runs"][-1]
    assert run["strategy"] == "processes"
    assert run["start_method"] == "fork"
    assert run["chunks"] == 10
    assert run["items"] == 20
    assert run["compute_s"] >= 20 * 0.005 * 0.9  # measured in the workers
    assert run["bytes_pickled"] > 0
    assert run["dispatch_overhead_s"] > 0
    assert run["queue_wait_s"] >= 0
    assert run["failures"] == 0


def test_unpicklable_fn_is_named_before_dispatch() -> None:
    lock = threading.Lock()

    def holds_a_lock(x: int) -> int:
        with lock:
            return x

    with ParallelExecutor(_config()) as ex:
        with pytest.raises(
            pickle.PicklingError, match=r"fn=.*holds_a_lock.*Nothing was dispatched"
        ):
            ex.map(holds_a_lock, range(4))
        # a lambda is fine: cloudpickle sends it by value
        assert ex.map(lambda x: x + 1, range(4)) == [1, 2, 3, 4]
        runs = ex.telemetry.summary()["runs"]
    assert runs[0]["chunks"] == 0


def test_start_method_unavailable_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_context, "available_start_methods", lambda: ("spawn",))
    with pytest.raises(ConfigError, match=r"start_method='fork' is not available"):
        ParallelExecutor(_config()).__enter__()
    with pytest.raises(ConfigError, match="start_method"):
        ParallelConfig(strategy="processes", start_method="vfork")
    with pytest.raises(ConfigError, match="max_workers"):
        ParallelConfig(strategy="processes", max_workers=0)


@LINUX_ONLY
def test_no_shared_memory_means_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_context, "SHM_DIR", "/nonexistent-shm")
    with pytest.raises(StrategyUnavailableError, match="CE_PARALLEL=off") as caught:
        ParallelExecutor(_config()).__enter__()
    assert "/nonexistent-shm" in str(caught.value)
    with ParallelExecutor(_config(force_serial_on_failure=True)) as ex:
        with pytest.warns(FallbackWarning, match="nonexistent-shm"):
            assert ex.map(identity, range(10)) == list(range(10))
        run = ex.telemetry.summary()["runs"][-1]
    assert run["strategy"] == "serial"
    assert run["fallbacks"]


def test_forked_child_of_the_caller_gets_its_own_pool() -> None:
    with ParallelExecutor(_config()) as ex:
        parent_pids = set(ex.map(pid_after, range(4), chunk_size=1))
        strategy = ex._strategies["processes"]  # white-box check
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                # the parent's pool is off limits here...
                try:
                    next(strategy.run(identity, [], (), None))
                except BrokenExecutorError:
                    code = 2
                # ...and the executor starts a pool of the child's own
                child_pids = set(ex.map(pid_after, range(4), chunk_size=1))
                if code == 2 and not (child_pids & parent_pids):
                    code = 0
            except BaseException:
                code = 3
            os.write(write, bytes([code]))
            os._exit(0)  # no atexit: the child's supervisor sees EOF, cleans up
        os.close(write)
        status = os.read(read, 1)
        os.close(read)
        os.waitpid(pid, 0)
        assert status == bytes([0])
        assert set(ex.map(pid_after, range(4), chunk_size=1)) == parent_pids


def test_atexit_handler_is_registered_once() -> None:
    from engine.strategies import processes

    for _ in range(2):
        with ParallelExecutor(_config(max_workers=1)) as ex:
            ex.map(identity, range(2))
    assert processes._atexit_installed
    assert not list(processes._live)  # closed pools leave it


@pytest.mark.skipif(sys.platform != "linux", reason="Linux: PR_SET_PDEATHSIG")
def test_workers_get_pdeathsig() -> None:
    with ParallelExecutor(_config()) as ex:
        ex.map(identity, range(2))
        for worker in _supervisor().children():
            status = Path(f"/proc/{worker.pid}/status").read_text()
            assert worker.pid != os.getpid()
            assert "SigIgn" in status  # SIGINT is ignored (bit 2)
            ignored = int(
                next(
                    line for line in status.splitlines() if line.startswith("SigIgn")
                ).split()[1],
                16,
            )
            assert ignored & (1 << (2 - 1))


def test_packs_respect_worker_max_tasks() -> None:
    import collections

    with ParallelExecutor(_config(worker_max_tasks=50)) as ex:
        # tiny chunks: after the first results they travel in packs
        pids = ex.map(pid_after, range(3000), chunk_size=1)
    per_worker = collections.Counter(pids)
    assert max(per_worker.values()) <= 50
    assert sum(per_worker.values()) == 3000
