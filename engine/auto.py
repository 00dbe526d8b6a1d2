"""The auto strategy: a pure function from a workload estimate to a choice.

``choose(estimate)`` reads nothing from the environment or the clock; the
executor measures and passes everything in, so the heuristic is unit-tested
over a table of synthetic estimates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, final

# Below this many items per worker, parallel start-up and dispatch cost more
# than they save for typical explainer work (ci/bench/dispatch.py, W6).
MIN_ITEMS_PER_WORKER: Final = 2

# Strategies auto considers, best first, when ParallelConfig.prefer is empty.
DEFAULT_ORDER: Final = ("processes", "threads", "serial")


@final
@dataclass(frozen=True)
class Estimate:
    """What is known of a run before it starts."""

    n_items: int | None
    usable_cpus: int
    max_workers: int | None = None
    nested: bool = False
    available: tuple[str, ...] = ("serial", "threads")
    prefer: tuple[str, ...] = ()
    releases_gil: bool = False
    item_cost_s: float | None = None
    task_bytes: int | None = None
    shared_bytes: int = 0


@final
@dataclass(frozen=True)
class Choice:
    """The strategy, worker count and chunk size auto picked, and why."""

    strategy: str
    max_workers: int
    chunk_size: int | None
    reason: str


def _candidates(estimate: Estimate) -> list[str]:
    order = estimate.prefer or DEFAULT_ORDER
    return [name for name in order if name in estimate.available]


def choose(estimate: Estimate) -> Choice:
    """Pick a strategy for ``estimate``.

    Parameters
    ----------
    estimate : Estimate
        Item count, usable CPUs, nesting, available strategies, preference.

    Returns
    -------
    Choice
        The strategy, workers, chunk size (``None``: the executor's default)
        and a one-line reason, recorded in telemetry.
    """
    workers = min(estimate.max_workers or estimate.usable_cpus, estimate.usable_cpus)
    if estimate.nested:
        return Choice("serial", 1, None, "nested inside a worker: run serially")
    if workers < 2:
        return Choice("serial", 1, None, "only one usable CPU")
    n_items = estimate.n_items
    if n_items is not None and n_items < MIN_ITEMS_PER_WORKER * workers:
        return Choice(
            "serial",
            1,
            None,
            f"{n_items} items < {MIN_ITEMS_PER_WORKER} per worker x {workers} workers",
        )
    candidates = _candidates(estimate)
    if estimate.releases_gil and "threads" in candidates:
        return Choice("threads", workers, None, "work releases the GIL: threads")
    for name in candidates:
        if name != "serial":
            return Choice(name, workers, None, f"first available of {candidates}")
    return Choice("serial", 1, None, f"no parallel strategy among {candidates}")
