"""auto.choose over a table of synthetic workload estimates."""

from __future__ import annotations

import pytest

from engine.auto import (
    MIN_PARALLEL_WORK_S,
    TARGET_CHUNK_S,
    Estimate,
    choose,
    chunk_size_for,
    predict_s,
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
