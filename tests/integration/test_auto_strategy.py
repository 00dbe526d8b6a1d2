"""The auto strategy end to end: probe kept, identity, tiny work stays serial."""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

import pytest
from _crash_tasks import pid_after
from _tasks import (
    TaskError,
    pid_unless,
    shuffled_sleep,
    sleep_s,
    slower_in_workers,
    square,
)

from engine import ParallelConfig, ParallelExecutor
from engine._planner import REPROBE_EVERY, releases_gil


class Counter:
    """Counts calls in the caller (serial/threads only)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x: int) -> int:
        self.calls.append(x)
        return x * 2


def test_probe_results_are_kept_not_recomputed() -> None:
    counter = Counter()
    config = ParallelConfig(
        strategy="auto", prefer=("threads", "serial"), min_batch_size=1
    )
    with ParallelExecutor(config) as ex:
        assert ex.map(counter, range(200)) == [x * 2 for x in range(200)]
    assert sorted(counter.calls) == list(range(200))


def test_tiny_work_stays_serial() -> None:
    fn = functools.partial(time.sleep)
    with ParallelExecutor(ParallelConfig(strategy="auto", min_batch_size=1)) as ex:
        ex.map(lambda _: fn(0.001), range(5))
        run = ex.telemetry.summary()["runs"][-1]
    assert run["strategy"] == "serial"
    assert run["items"] == 5


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_auto_matches_serial(chunk_size: int | None) -> None:
    fn = functools.partial(shuffled_sleep, seed=11)
    expected = [fn(i) for i in range(120)]
    config = ParallelConfig(
        strategy="auto", prefer=("threads", "serial"), min_batch_size=1
    )
    with ParallelExecutor(config) as ex:
        assert ex.map(fn, range(120), chunk_size=chunk_size) == expected
        assert list(ex.imap(square, iter(range(50)))) == [square(i) for i in range(50)]
        summary = ex.telemetry.summary()
    assert summary["items"] == 170
    assert all(run["reason"] for run in summary["runs"])


def test_releases_gil_detection() -> None:
    def plain(x: Any) -> Any:
        return x

    marked = functools.partial(plain)
    assert not releases_gil(plain)
    plain.releases_gil = True  # type: ignore[attr-defined]
    assert releases_gil(marked)

    numba = pytest.importorskip("numba")

    @numba.njit(nogil=True)
    def kernel(x: float) -> float:
        return x + 1.0

    assert releases_gil(kernel)


def test_forked_child_forgets_parent_runs_and_pools() -> None:
    import os

    config = ParallelConfig(strategy="threads", max_workers=2, min_batch_size=1)
    with ParallelExecutor(config) as ex:
        ex.map(square, range(10))
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: the parent's runs and thread pool are not ours
            try:
                runs = ex.telemetry.summary()["run_count"]
                result = ex.map(square, range(10))
                ok = runs == 0 and result == [square(i) for i in range(10)]
                os.write(write_end, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(write_end)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        answer = os.read(read_end, 1)
        os.close(read_end)
        assert answer == b"1"
        assert ex.telemetry.summary()["run_count"] == 1


def test_a_pool_never_started_costs_its_default_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 60 ms of work: a warm process pool would halve it, but none has been
    # started in this process, so auto counts auto.DEFAULT_STARTUP_S (a cold
    # pool took 0.35-2.6 s here) and stays serial. An unmeasured start-up
    # once counted as zero.
    import engine._planner

    monkeypatch.setattr(engine._planner, "STARTUP_S", {})
    config = ParallelConfig(
        strategy="auto", prefer=("processes", "serial"), min_batch_size=1
    )
    with ParallelExecutor(config) as ex:
        assert ex.map(sleep_s, range(6), 0.01) == list(range(6))
        summary = ex.telemetry.summary()
    assert summary["strategy"] == "serial", summary["reason"]
    assert "processes 0.3" in summary["reason"]


def test_repeated_runs_pay_off_a_cold_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each map is 100 ms of work that a warm pool would halve, too little to
    # pay a cold pool's default start-up (0.35 s) at once: auto stays serial,
    # adds up the gains it forgoes, and starts the pool once they reach it.
    import engine._planner

    monkeypatch.setattr(engine._planner, "STARTUP_S", {})
    config = ParallelConfig(
        strategy="auto", prefer=("processes", "serial"), min_batch_size=1
    )
    with ParallelExecutor(config) as ex:
        for _ in range(10):
            assert ex.map(sleep_s, range(10), 0.01) == list(range(10))
        strategies = [run.strategy for run in ex.telemetry.runs]
    first = strategies.index("processes")
    assert 4 <= first <= 9, strategies
    assert set(strategies[:first]) == {"serial"}
    assert set(strategies[first:]) == {"processes"}, strategies


@pytest.mark.skipif(sys.platform == "win32", reason="uses fork")
def test_a_noisy_clock_on_trivial_items_does_not_send_them_to_a_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every clock read costs 5 us (an interrupt, a cache miss): three trivial
    # items then "take" 10 us, which projects 10,000 items to 33 ms, over
    # MIN_PARALLEL_WORK_S. auto must not trust so little measured work: it
    # keeps probing in doubling batches and, with all 10,000 items run for
    # ~70 us of clock, finishes them in the caller.
    import engine._planner

    now = [0.0]

    class SlowClock:
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def perf_counter(self) -> float:
            now[0] += 5e-6
            return now[0]

    monkeypatch.setattr(engine._planner, "time", SlowClock())
    config = ParallelConfig(
        strategy="auto", prefer=("threads", "serial"), min_batch_size=1
    )
    with ParallelExecutor(config) as ex:
        assert ex.map(square, range(10_000)) == [x * x for x in range(10_000)]
        (run,) = ex.telemetry.runs
    assert run.strategy == "serial"
    assert "ran in the caller" in run.reason


def test_a_known_tiny_function_runs_in_one_loop_without_probing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first map of a cheap function probes item by item (three single
    # items, then doubling batches: the planner reads the clock after each);
    # once its cost is known, a map projected under MIN_PARALLEL_WORK_S runs
    # as one loop in the caller, without the probe, in order, with its run
    # recorded.
    import engine._planner

    reads: list[float] = []

    class CountingTime:  # the planner's own clock only
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def perf_counter(self) -> float:
            reads.append(time.perf_counter())
            return reads[-1]

    monkeypatch.setattr(engine._planner, "time", CountingTime())
    counter = Counter()
    with ParallelExecutor(ParallelConfig(strategy="auto", min_batch_size=1)) as ex:
        assert ex.map(counter, range(10)) == [x * 2 for x in range(10)]
        first_reads = len(reads)
        reads.clear()
        assert ex.map(counter, range(10, 20)) == [x * 2 for x in range(10, 20)]
        assert list(ex.imap(counter, range(20, 25))) == [x * 2 for x in range(20, 25)]
        runs = ex.telemetry.runs
    assert first_reads >= 5
    assert reads == []  # no probe
    assert counter.calls == list(range(25))
    assert [run.strategy for run in runs] == ["serial"] * 3
    assert [run.items for run in runs] == [10, 10, 5]
    assert "known cost" in runs[1].reason
    assert "known cost" in runs[2].reason


def _auto_with_free_fork_pools(monkeypatch: pytest.MonkeyPatch) -> ParallelConfig:
    """auto over processes (fork) and serial, a pool's start-up counted as 0."""
    import engine._planner

    monkeypatch.setattr(engine._planner, "STARTUP_S", {("processes", "fork"): 0.0})
    return ParallelConfig(
        strategy="auto",
        prefer=("processes", "serial"),
        start_method="fork",
        min_batch_size=1,
    )


def test_a_known_function_skips_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first map probes its first items in the caller; the next map of the
    # same function reuses that cost and sends every item to the pool, which
    # starts dispatching as imap is called.
    me = os.getpid()
    with ParallelExecutor(_auto_with_free_fork_pools(monkeypatch)) as ex:
        first = ex.map(pid_after, range(8), 0.02)
        second = ex.map(pid_after, range(8), 0.02)
        strategies = [run.strategy for run in ex.telemetry.runs]
    assert first[0] == me  # the probe ran here
    assert me not in second
    assert strategies == ["processes", "processes"]


def test_a_warm_pool_is_not_probed_again_in_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Maps of 3 items of 20 ms (W1-W2's shape). The first map's probe runs
    # one item in the caller, not all three (PROBE_SHARE); after it, every
    # map goes to the warm pool: each finished map refreshes the cost from
    # the workers' clocks, so none is re-probed serially in the caller.
    me = os.getpid()
    with ParallelExecutor(_auto_with_free_fork_pools(monkeypatch)) as ex:
        first = ex.map(pid_after, range(3), 0.02)
        later = [
            ex.map(pid_after, range(3), 0.02) for _ in range(2 * REPROBE_EVERY + 2)
        ]
        strategies = {run.strategy for run in ex.telemetry.runs}
    assert first[0] == me
    assert me not in first[1:]
    assert all(me not in pids for pids in later), later
    assert strategies == {"processes"}


def _split_of_w6() -> Any:
    """How a map of 5 items of 1 ms splits here (None: it does not)."""
    from engine._context import usable_cpu_count
    from engine.auto import split_tiny

    return split_tiny(5, 0.001, workers=2, usable_cpus=usable_cpu_count())


@pytest.fixture
def split_config(monkeypatch: pytest.MonkeyPatch) -> ParallelConfig:
    """auto over fork pools that start for free, 2 workers; W6-like maps split.

    Every map counts as under MIN_PARALLEL_WORK_S: on a loaded machine the
    1 ms sleeps stretched to 4 ms and more, and the maps, now 20 ms of
    measured work, rightly went to the pool whole.
    """
    import engine._auto_runs
    import engine._planner

    if _split_of_w6() is None:
        pytest.skip("one usable CPU: no split")
    for module in (engine._auto_runs, engine._planner):
        monkeypatch.setattr(module, "MIN_PARALLEL_WORK_S", 10.0)
    return _auto_with_free_fork_pools(monkeypatch).replace(max_workers=2)


@pytest.mark.skipif(sys.platform == "win32", reason="uses fork")
def test_a_tiny_map_shares_the_warm_pool_with_the_caller(
    split_config: ParallelConfig,
) -> None:
    # 5 items of 1 ms: under MIN_PARALLEL_WORK_S, too small for a pool of
    # its own, but with a pool warm the caller runs its share while the pool
    # runs the rest. The first map probes (all in the caller); the second,
    # of known cost, starts the pool (its start-up counted as 0) and
    # splits; so do the next.
    split = _split_of_w6()
    me = os.getpid()
    with ParallelExecutor(split_config) as ex:
        maps = [ex.map(pid_unless, range(5), -1, 0.001) for _ in range(4)]
        runs = ex.telemetry.runs
    assert maps[0] == [me] * 5
    head = split.caller_items
    for pids in maps[1:]:
        assert pids[:head] == [me] * head
        assert me not in pids[head:]
    assert [run.strategy for run in runs] == ["serial"] + ["processes"] * 3
    assert [run.items for run in runs] == [5] * 4
    wanted = f"the caller ran {head} items while the process pool ran {5 - head}"
    assert all(wanted in run.reason for run in runs[1:])
    assert "paid off" in runs[1].reason
    assert "paid off" not in runs[2].reason


@pytest.mark.skipif(sys.platform == "win32", reason="uses fork")
@pytest.mark.parametrize("where", ["caller", "pool"])
def test_an_error_in_a_split_map_propagates_and_the_pool_stays_usable(
    split_config: ParallelConfig, where: str
) -> None:
    split = _split_of_w6()
    bad = 0 if where == "caller" else 4
    with ParallelExecutor(split_config) as ex:
        ex.map(pid_unless, range(5), -1, 0.001)  # the cost is known now
        with pytest.raises(TaskError, match=f"item {bad} is bad"):
            ex.map(pid_unless, range(5), bad, 0.001)
        pids = ex.map(pid_unless, range(5), -1, 0.001)
        runs = ex.telemetry.runs
    assert pids[: split.caller_items] == [os.getpid()] * split.caller_items
    assert [run.strategy for run in runs] == ["serial", "processes", "processes"]
    assert runs[1].status != "ok"
    assert runs[2].status == "ok"


@pytest.mark.skipif(sys.platform == "win32", reason="uses fork")
def test_splits_that_turn_out_slower_than_one_loop_stop(
    split_config: ParallelConfig,
) -> None:
    # Items that take 4x as long in a worker (W5 of the full ablation: 2x):
    # the split is predicted to pay and does not. The map that starts the
    # pool is not judged (start-up); the next SPLIT_JUDGED_MIN maps are, and
    # the maps after them run in the caller again.
    from engine._planner import SPLIT_JUDGED_MIN

    me = os.getpid()
    with ParallelExecutor(split_config) as ex:
        for _ in range(2 + SPLIT_JUDGED_MIN + 3):
            assert ex.map(slower_in_workers, range(5), me, 0.001) == list(range(5))
        strategies = [run.strategy for run in ex.telemetry.runs]
    pooled = 1 + SPLIT_JUDGED_MIN
    assert strategies == ["serial"] + ["processes"] * pooled + ["serial"] * 3


@pytest.mark.skipif(sys.platform == "win32", reason="uses fork")
def test_an_explicit_chunk_size_keeps_a_tiny_map_in_the_caller(
    split_config: ParallelConfig,
) -> None:
    me = os.getpid()
    with ParallelExecutor(split_config) as ex:
        for _ in range(3):
            assert ex.map(pid_unless, range(5), -1, 0.001, chunk_size=2) == [me] * 5
        assert {run.strategy for run in ex.telemetry.runs} == {"serial"}
    with ParallelExecutor(split_config.replace(instance_chunk_size=2)) as ex:
        for _ in range(3):
            assert ex.map(pid_unless, range(5), -1, 0.001) == [me] * 5


def test_strategies_ran_counts_what_each_map_ran_as() -> None:
    # The ablation reports what auto's maps ran as (engine._workloads).
    from engine._workloads import last_run_id, strategies_ran

    assert strategies_ran(None, 0) == {}
    assert last_run_id(None) == 0
    with ParallelExecutor(ParallelConfig(strategy="auto", min_batch_size=1)) as ex:
        assert last_run_id(ex) == 0
        ex.map(square, range(5))
        since = last_run_id(ex)
        assert since > 0
        for _ in range(3):
            ex.map(square, range(5))
        assert strategies_ran(ex, since) == {"caller": 3}
        assert strategies_ran(ex, 0) == {"caller": 4}
    fields = {"strategy": "processes", "start_method": "fork", "max_workers": 2}
    with ParallelExecutor(ParallelConfig(min_batch_size=1, **fields)) as ex:
        ex.map(square, range(8))
        with ParallelExecutor(ParallelConfig(strategy="threads")) as other:
            other.map(square, range(8), chunk_size=2)
            assert strategies_ran(other, 0) == {"threads": 1}
        ex.map(square, range(8))
        assert strategies_ran(ex, 0) == {"processes/fork": 2}
