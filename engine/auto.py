"""The auto strategy: a pure function from a workload estimate to a choice.

``choose(estimate)`` reads nothing from the environment or the clock; the
executor measures (a short serial probe of the first items, pickled sizes,
pool start-up costs) and passes everything in, so the heuristic is unit-tested
over a table of synthetic estimates. It predicts each candidate's wall time
with a small cost model and picks the fastest; the reason names the numbers.

Cost model, per candidate with ``w`` workers and ``n`` items of cost ``c``::

    serial     n*c
    threads    start + n*c / (w if fn releases the GIL else 1) + n*THREAD_ITEM_S
    processes  start + n*c / w + n*(PROCESS_ITEM_S + bytes/PICKLE_BYTES_PER_S)
    joblib     as processes, with joblib's own start and per-item costs

A map under ``MIN_PARALLEL_WORK_S`` may still share a warm process pool with
the caller (``split_tiny``): the caller runs ``ceil(n/cpus)`` items while the
pool runs the rest, predicted as the slower of the two sides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final, final

# A run whose whole serial cost is below this never goes parallel: even a warm
# pool costs ~1-3 ms per map in dispatch and wake-ups (ci/bench/warm.py, W7;
# W6 must stay within 1.05x of the serial loop).
MIN_PARALLEL_WORK_S: Final = 0.02

# Per-item overhead of the process strategy with auto chunking, and of a
# thread pool (ci/bench/dispatch.py, W4: ~0.4-8 us/item with chunks).
PROCESS_ITEM_S: Final = 10e-6
THREAD_ITEM_S: Final = 5e-6
JOBLIB_ITEM_S: Final = 20e-6

# Pickling round-trip throughput for task payloads that are not in shared
# memory: 100 MiB took ~428 ms here (BENCH.md, W5 baseline).
PICKLE_BYTES_PER_S: Final = 245e6

# Start-up costs used until the executor has measured its own (BENCH.md:
# spawn with numpy+numba 0.6-0.9 s; our supervisor forks workers, ~0.3 s).
DEFAULT_STARTUP_S: Final[Mapping[str, float]] = {
    "serial": 0.0,
    "threads": 0.001,
    "processes": 0.35,
    "joblib": 0.8,
}

# Parallel must beat serial by this factor to be worth its risk and noise.
MIN_GAIN: Final = 1.1

# auto aims each chunk at this duration: long enough that per-chunk overhead
# (~50-100 us for processes) stays under 1 %, short enough for load balance
# and a prompt cancel (joblib aims at 0.2 s; ci/bench/dispatch.py).
TARGET_CHUNK_S: Final = 0.02

# Strategies auto considers, in this order on ties, when prefer is empty.
DEFAULT_ORDER: Final = ("processes", "threads", "joblib", "serial")

# A map under MIN_PARALLEL_WORK_S may still share a warm process pool: the
# caller runs its first items while the pool runs the rest as one chunk per
# other CPU (split_tiny). The pool's side then costs its items plus one round
# trip: one chunk's map on a warm pool, executor bookkeeping included, took
# 0.75-0.82 ms between other work and 0.37-0.48 ms back to back here
# (ci/bench/share.py, "round trip"; 3 runs each).
SHARE_ROUND_TRIP_S: Final = 0.0008
# ...so a map with less work than this never gains MIN_GAIN by a split: it is
# not even considered (W7's 20 maps of 10 trivial items paid 15-20 us a map
# to be told so).
MIN_SPLIT_WORK_S: Final = MIN_GAIN * SHARE_ROUND_TRIP_S


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
    startup_s: Mapping[str, float] = field(default_factory=dict)


@final
@dataclass(frozen=True)
class Split:
    """A tiny map shared between the caller and a warm process pool."""

    caller_items: int
    chunk_size: int
    predicted_s: float


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
    return [name for name in order if name in estimate.available and name != "dask"]


def predict_s(name: str, estimate: Estimate, workers: int) -> float:
    """Predicted wall seconds of strategy ``name`` (the module's cost model)."""
    n_items = estimate.n_items or 0
    cost = estimate.item_cost_s or 0.0
    work = n_items * cost
    if name == "serial":
        return work
    start = estimate.startup_s.get(name, DEFAULT_STARTUP_S.get(name, 1.0))
    if name == "threads":
        speedup = workers if estimate.releases_gil else 1
        return start + work / speedup + n_items * THREAD_ITEM_S
    per_item = PROCESS_ITEM_S if name == "processes" else JOBLIB_ITEM_S
    pickled = (estimate.task_bytes or 0) / PICKLE_BYTES_PER_S
    return start + work / workers + n_items * (per_item + pickled)


def chunk_size_for(
    item_cost_s: float | None, n_items: int | None, workers: int
) -> int | None:
    """Items per chunk aiming at ``TARGET_CHUNK_S``, at least 4 chunks per worker."""
    if item_cost_s is None or n_items is None or n_items <= 0:
        return None
    by_time = max(1, int(TARGET_CHUNK_S / max(item_cost_s, 1e-9)))
    balance = max(1, math.ceil(n_items / (4 * workers)))
    return min(by_time, balance)


def choose(estimate: Estimate) -> Choice:
    """Pick a strategy for ``estimate``.

    Parameters
    ----------
    estimate : Estimate
        Item count and measured per-item cost, usable CPUs, nesting, available
        strategies and preference, GIL release, payload sizes, start-up costs.

    Returns
    -------
    Choice
        The strategy, workers, chunk size (``None``: the executor's default)
        and a one-line reason, recorded in telemetry.
    """
    workers = max(
        1, min(estimate.max_workers or estimate.usable_cpus, estimate.usable_cpus)
    )
    candidates = _candidates(estimate)
    if estimate.nested:
        return Choice("serial", 1, None, "nested inside a worker: run serially")
    if workers < 2:
        return Choice("serial", 1, None, "only one usable CPU")
    parallel = [name for name in candidates if name != "serial"]
    if not parallel:
        return Choice("serial", 1, None, f"no parallel strategy among {candidates}")
    n_items = estimate.n_items
    if n_items is not None and n_items < 2:
        return Choice("serial", 1, None, f"{n_items} item(s) left: nothing to split")
    if estimate.item_cost_s is None or n_items is None:
        # Nothing measured (a stream of unknown length): the first preference.
        return Choice(
            parallel[0], workers, None, "no estimate: first preferred strategy"
        )
    work = n_items * estimate.item_cost_s
    if work < MIN_PARALLEL_WORK_S and "serial" in (estimate.prefer or DEFAULT_ORDER):
        reason = (
            f"{work * 1e3:.2f} ms of work < {MIN_PARALLEL_WORK_S * 1e3:.0f} ms: serial"
        )
        return Choice("serial", 1, None, reason)
    serial_s = work
    predictions = {name: predict_s(name, estimate, workers) for name in parallel}
    best = min(parallel, key=lambda name: (predictions[name], parallel.index(name)))
    chunk = chunk_size_for(estimate.item_cost_s, n_items, workers)
    summary = ", ".join(
        f"{name} {seconds:.3f}s" for name, seconds in predictions.items()
    )
    if "serial" in candidates and predictions[best] * MIN_GAIN > serial_s:
        return Choice("serial", 1, None, f"serial {serial_s:.3f}s beats {summary}")
    return Choice(
        best, workers, chunk, f"predicted {summary} vs serial {serial_s:.3f}s"
    )


def choose_amortised(estimate: Estimate, forgone_s: float) -> tuple[Choice, float]:
    """:func:`choose`, with a cold pool's start-up paid off over repeated runs.

    A run that a warm pool would speed up, but not enough to pay the pool's
    start-up, stays serial; the gain it forgoes is added up by the caller (per
    executor) and passed back as ``forgone_s``. Once the gains forgone reach
    the start-up cost, the pool is started (the ski-rental rule: never pay
    more than twice what knowing the future would have cost). An executor
    asked again and again for the same 100 ms of work starts its pool after a
    few calls instead of never.

    Returns
    -------
    choice : Choice
        What to run.
    gain_s : float
        The gain this run forgoes by running serially (0 when it does not).
    """
    choice = choose(estimate)
    if choice.strategy != "serial" or not estimate.n_items:
        return choice, 0.0
    if estimate.item_cost_s is None:
        return choice, 0.0
    warm_estimate = replace(estimate, startup_s=dict.fromkeys(estimate.available, 0.0))
    warm = choose(warm_estimate)
    if warm.strategy == "serial":
        return choice, 0.0
    work = estimate.n_items * estimate.item_cost_s
    gain = work - predict_s(warm.strategy, warm_estimate, warm.max_workers)
    start = estimate.startup_s.get(
        warm.strategy, DEFAULT_STARTUP_S.get(warm.strategy, 1.0)
    )
    if gain > 0 and forgone_s + gain >= start:
        reason = (
            f"{warm.reason}; its {start:.3f}s start-up is paid off by "
            f"{forgone_s + gain:.3f}s forgone in serial runs"
        )
        return Choice(warm.strategy, warm.max_workers, warm.chunk_size, reason), gain
    return choice, max(0.0, gain)


def split_tiny(
    n_items: int,
    item_cost_s: float,
    *,
    workers: int,
    usable_cpus: int,
    task_bytes: int | None = None,
) -> Split | None:
    """How a map too small for a pool of its own shares a warm process pool.

    The caller runs the first ``caller_items`` while the pool runs the rest
    in chunks of ``chunk_size``, one per other CPU, so no CPU idles and no
    process waits for one. Returns ``None`` when that would not beat one loop
    in the caller by ``MIN_GAIN`` (few or trivial items, one CPU or worker).
    """
    cpus = min(usable_cpus, workers + 1)
    if workers < 2 or cpus < 2 or n_items < 2:
        return None
    if n_items * item_cost_s < MIN_SPLIT_WORK_S:
        return None
    caller = math.ceil(n_items / cpus)
    chunk = math.ceil((n_items - caller) / (cpus - 1))
    per_item = item_cost_s + PROCESS_ITEM_S + (task_bytes or 0) / PICKLE_BYTES_PER_S
    predicted = max(caller * item_cost_s, chunk * per_item + SHARE_ROUND_TRIP_S)
    if predicted * MIN_GAIN > n_items * item_cost_s:
        return None
    return Split(caller, chunk, predicted)
