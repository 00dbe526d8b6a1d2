"""auto.choose over a table of synthetic workload estimates."""

from __future__ import annotations

import pytest

from engine.auto import (
    MIN_GAIN,
    MIN_PARALLEL_WORK_S,
    MIN_SPLIT_WORK_S,
    SHARE_ROUND_TRIP_S,
    TARGET_CHUNK_S,
    Estimate,
    Split,
    choose,
    choose_amortised,
    chunk_size_for,
    predict_s,
    split_tiny,
)

ALL = ("serial", "threads", "processes", "joblib")
MS = 1e-3


def _estimate(**fields: object) -> Estimate:
    base: dict[str, object] = {
        "n_items": 1000,
        "usable_cpus": 2,
        "available": ALL,
        "item_cost_s": 10 * MS,
    }
    return Estimate(**{**base, **fields})  # type: ignore[arg-type]


CASES = [
    # name, estimate, expected strategy
    ("tiny work", _estimate(n_items=5, item_cost_s=1 * MS), "serial"),
    ("GIL-bound heavy work", _estimate(), "processes"),
    ("nogil kernel", _estimate(releases_gil=True), "threads"),
    ("nested", _estimate(nested=True), "serial"),
    ("one CPU", _estimate(usable_cpus=1), "serial"),
    ("max_workers=1", _estimate(max_workers=1), "serial"),
    ("huge pickled payload", _estimate(task_bytes=200 * 1024**2), "serial"),
    (
        "huge payload, nogil",
        _estimate(task_bytes=200 * 1024**2, releases_gil=True),
        "threads",
    ),
    ("one item", _estimate(n_items=1, item_cost_s=5.0), "serial"),
    (
        "only serial+threads, GIL-bound",
        _estimate(available=("serial", "threads")),
        "serial",
    ),
    (
        "prefer threads (nogil)",
        _estimate(prefer=("threads",), releases_gil=True),
        "threads",
    ),
    ("prefer serial", _estimate(prefer=("serial",)), "serial"),
    ("unknown length stream", _estimate(n_items=None, item_cost_s=None), "processes"),
    (
        "warm pool makes small work pay",
        _estimate(n_items=40, item_cost_s=1.5 * MS, startup_s={"processes": 0.0}),
        "processes",
    ),
    (
        "cold pool does not pay for small work",
        _estimate(n_items=40, item_cost_s=1.5 * MS),
        "serial",
    ),
    ("start-up amortised", _estimate(n_items=200, item_cost_s=20 * MS), "processes"),
]


@pytest.mark.parametrize(
    ("name", "estimate", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_choose(name: str, estimate: Estimate, expected: str) -> None:
    choice = choose(estimate)
    assert choice.strategy == expected, choice.reason
    assert choice.reason
    assert choice.max_workers >= 1
    if expected == "serial":
        assert choice.max_workers == 1


def test_workers_never_exceed_cpus() -> None:
    choice = choose(_estimate(max_workers=16))
    assert choice.max_workers == 2


def test_tiny_threshold_boundary() -> None:
    just_below = MIN_PARALLEL_WORK_S * 0.99 / 100
    assert choose(_estimate(n_items=100, item_cost_s=just_below)).strategy == "serial"


def test_prediction_is_monotone_in_work() -> None:
    small = predict_s("processes", _estimate(item_cost_s=1 * MS), 2)
    large = predict_s("processes", _estimate(item_cost_s=2 * MS), 2)
    assert large > small


@pytest.mark.parametrize(
    ("cost", "n_items", "workers", "expected"),
    [
        (None, 100, 2, None),
        (1e-6, 10_000, 2, 1250),  # time target allows 20,000: balance caps it
        (TARGET_CHUNK_S, 1000, 2, 1),  # one item already fills the target
        (1e-3, 1000, 2, 20),
    ],
)
def test_chunk_size_for(
    cost: float | None, n_items: int, workers: int, expected: int
) -> None:
    assert chunk_size_for(cost, n_items, workers) == expected


# 100 ms of GIL-bound work: a warm process pool halves it, a cold one costs
# its 0.35 s default start-up.
REPEATED = _estimate(n_items=10, item_cost_s=10 * MS, available=("serial", "processes"))


def test_a_cold_pool_stays_serial_and_counts_the_gain_forgone() -> None:
    choice, gain = choose_amortised(REPEATED, 0.0)
    assert choice.strategy == "serial"
    expected = 0.1 - predict_s(
        "processes",
        Estimate(**{**REPEATED.__dict__, "startup_s": {"processes": 0.0}}),
        2,
    )
    assert gain == pytest.approx(expected)
    assert 0.04 < gain < 0.05


def test_the_pool_starts_once_the_gains_forgone_pay_its_start_up() -> None:
    forgone, runs = 0.0, 0
    while True:
        choice, gain = choose_amortised(REPEATED, forgone)
        runs += 1
        if choice.strategy != "serial":
            break
        forgone += gain
    assert choice.strategy == "processes"
    assert "paid off" in choice.reason
    assert runs == 8  # 7 serial runs forgo 0.33 s; the 8th reaches 0.35 s


def test_amortising_never_starts_a_pool_for_tiny_or_nested_work() -> None:
    for estimate in (
        _estimate(n_items=5, item_cost_s=1 * MS),
        _estimate(nested=True),
        _estimate(usable_cpus=1),
    ):
        choice, gain = choose_amortised(estimate, 100.0)
        assert (choice.strategy, gain) == ("serial", 0.0)


def test_a_warm_choice_is_returned_as_is() -> None:
    assert choose_amortised(_estimate(), 0.0) == (choose(_estimate()), 0.0)


def test_one_slow_map_does_not_move_a_known_cost() -> None:
    # The planner keeps the lower median of a function's last measurements:
    # one map slowed by the machine must not send the next map elsewhere.
    from engine._planner import AutoPlanner
    from engine.config import ParallelConfig

    def fn(x: int) -> int:
        return x

    planner = AutoPlanner(ParallelConfig(strategy="auto"))
    items = list(range(5))
    assert planner.known_cost(fn, 5, items) is None
    planner.observed(fn, 5, 0.005)  # 1 ms an item
    planner.observed(fn, 5, 0.005)
    planner.observed(fn, 5, 0.025)  # one slow map: 5 ms an item
    assert planner.known_cost(fn, 5, items) == pytest.approx(0.001)
    planner.observed(fn, 5, 0.025)  # twice: the cost has changed
    assert planner.known_cost(fn, 5, items) == pytest.approx(0.005)
    planner.observed(fn, 5, 0.0005)  # under PROBE_MIN_S: not trusted
    assert planner.known_cost(fn, 5, items) == pytest.approx(0.005)


@pytest.mark.parametrize(
    ("n_items", "cost", "workers", "cpus", "task_bytes", "expected"),
    [
        # W6 on 2 CPUs: the caller runs 3 items, one worker the other 2.
        (5, 1 * MS, 2, 2, None, (3, 2)),
        # 4 CPUs, 4 workers: the caller runs 2, three workers 1 each.
        (5, 1 * MS, 4, 4, None, (2, 1)),
        # More workers than CPUs: one chunk per other CPU, not per worker.
        (6, 1 * MS, 8, 3, None, (2, 2)),
        # Trivial items (W7): the round trip alone costs more.
        (10, 1e-7, 2, 2, None, None),
        # Under MIN_SPLIT_WORK_S of work: never worth a round trip.
        (3, MIN_SPLIT_WORK_S / 4, 2, 2, None, None),
        # Pickling 10 MB items costs more than the items.
        (5, 1 * MS, 2, 2, 10_000_000, None),
        # One item, one CPU, one worker: nothing to share.
        (1, 10 * MS, 2, 2, None, None),
        (5, 1 * MS, 2, 1, None, None),
        (5, 1 * MS, 1, 2, None, None),
    ],
)
def test_split_tiny(
    n_items: int,
    cost: float,
    workers: int,
    cpus: int,
    task_bytes: int | None,
    expected: tuple[int, int] | None,
) -> None:
    split = split_tiny(
        n_items, cost, workers=workers, usable_cpus=cpus, task_bytes=task_bytes
    )
    if expected is None:
        assert split is None
        return
    assert isinstance(split, Split)
    assert (split.caller_items, split.chunk_size) == expected
    # It pays: MIN_GAIN over one loop, and it costs at least one round trip.
    assert split.predicted_s * MIN_GAIN <= n_items * cost
    assert split.predicted_s >= SHARE_ROUND_TRIP_S


def test_a_cold_pool_is_started_for_tiny_maps_once_their_gains_pay_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # AutoPlanner.split: with the pool cold, each W6-like map (5 items of
    # 1 ms: 5 ms in one loop, ~3 ms split) forgoes ~2 ms; the pool is
    # started by the map that brings the gains forgone to its start-up.
    import engine._planner as planner_module
    from engine._planner import AutoPlanner
    from engine.config import ParallelConfig

    monkeypatch.setattr(planner_module, "usable_cpu_count", lambda: 2)
    monkeypatch.setattr(planner_module, "STARTUP_S", {("processes", None): 0.0099})
    planner = AutoPlanner(ParallelConfig(strategy="auto"))
    answers = [
        planner.split(_fn, 5, 1 * MS, 7, warm=False, workers=2) for _ in range(6)
    ]
    assert answers[:4] == [None] * 4  # 8 ms forgone < 9.9 ms
    split, reason = answers[4]
    assert (split.caller_items, split.chunk_size) == (3, 2)
    assert "the caller ran 3 items while the process pool ran 2" in reason
    assert "0.010s start-up is paid off" in reason
    # Warm, every such map shares it, and the reason says no start-up.
    split, reason = planner.split(_fn, 5, 1 * MS, 7, warm=True, workers=2)
    assert split.caller_items == 3
    assert "start-up" not in reason
    # A preference without processes never splits.
    restricted = AutoPlanner(ParallelConfig(strategy="auto", prefer=("threads",)))
    assert restricted.split(_fn, 5, 1 * MS, 7, warm=True, workers=2) is None


def _fn(x: int) -> int:
    return x


def test_a_function_whose_splits_do_not_pay_is_not_split_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Predicted to pay, measured not to (W5 of the full ablation: the workers
    # took twice the caller's time per slice). The median of the last splits'
    # wall / loop decides, once SPLIT_JUDGED_MIN are known: an outlier or
    # two do not stop splits; a slow median stops them for a pause that
    # doubles with each slow verdict in a row and resets after a good one.
    import engine._planner as planner_module
    from engine._planner import SPLIT_JUDGED_MIN, SPLIT_RETRY_AFTER, AutoPlanner
    from engine.config import ParallelConfig

    monkeypatch.setattr(planner_module, "usable_cpu_count", lambda: 2)
    planner = AutoPlanner(ParallelConfig(strategy="auto"))
    planner.observed(_fn, 5, 0.005)

    def splits() -> bool:
        return planner.split(_fn, 5, 1 * MS, 7, warm=True, workers=2) is not None

    def judge(*ratios: float) -> None:
        for ratio in ratios:
            planner.split_done(_fn, wall_s=0.005 * ratio, loop_s=0.005)

    def paused() -> int:
        count = 0
        while not splits():
            count += 1
        return count

    judge(0.7, 1.5, 0.7, 1.5, 0.7)  # noise: the lower median stays 0.7
    assert splits()
    judge(1.4)  # three slow of the last five: 1.5, 0.7, 1.5, 0.7, 1.4
    assert paused() == SPLIT_RETRY_AFTER
    judge(9.0)  # the first split after a pause (an idle worker): not judged
    judge(*[1.4] * (SPLIT_JUDGED_MIN - 1))  # judged afresh: not enough yet
    assert splits()
    judge(1.4)
    assert paused() == 2 * SPLIT_RETRY_AFTER  # a verdict in a row: doubled
    judge(9.0, 0.7, 0.7, 0.7)  # pays again: the pause is reset
    judge(1.4, 1.4, 1.4)
    assert paused() == SPLIT_RETRY_AFTER
