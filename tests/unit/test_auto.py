"""auto.choose over a table of synthetic workload estimates."""

from __future__ import annotations

import pytest

from engine.auto import Estimate, choose

ALL = ("serial", "threads", "processes")

CASES = [
    # (estimate, expected strategy)
    (Estimate(n_items=1000, usable_cpus=2, available=ALL), "processes"),
    (Estimate(n_items=3, usable_cpus=2, available=ALL), "serial"),
    (Estimate(n_items=1000, usable_cpus=1, available=ALL), "serial"),
    (Estimate(n_items=1000, usable_cpus=8, nested=True, available=ALL), "serial"),
    (
        Estimate(n_items=1000, usable_cpus=2, releases_gil=True, available=ALL),
        "threads",
    ),
    (Estimate(n_items=1000, usable_cpus=2, available=("serial", "threads")), "threads"),
    (
        Estimate(n_items=1000, usable_cpus=2, prefer=("threads",), available=ALL),
        "threads",
    ),
    (
        Estimate(n_items=1000, usable_cpus=2, prefer=("serial",), available=ALL),
        "serial",
    ),
    (Estimate(n_items=None, usable_cpus=2, available=ALL), "processes"),
]


@pytest.mark.parametrize(("estimate", "expected"), CASES)
def test_choose(estimate: Estimate, expected: str) -> None:
    choice = choose(estimate)
    assert choice.strategy == expected
    assert choice.reason
    assert choice.max_workers >= 1
    if expected == "serial":
        assert choice.max_workers == 1


def test_workers_never_exceed_cpus() -> None:
    choice = choose(
        Estimate(n_items=1000, usable_cpus=2, max_workers=16, available=ALL)
    )
    assert choice.max_workers == 2
