"""W4 of BENCH.md: 10,000 trivial tasks on 2 workers, dispatch overhead only.

Two comparisons, each measured side by side in one run (A and B alternate for
``--rounds`` rounds after one warm-up round; medians compared as ratios):

* ``auto``: ``ParallelExecutor(strategy="processes").map(identity, items)``
  with the engine's own chunking, against
  ``joblib.Parallel(n_jobs=2, batch_size="auto")`` (loky backend, its
  reusable executor warm after the warm-up). Target: <= 0.5x joblib.
* ``chunk1``: the same map with ``chunk_size=1`` (one task per item, the
  worst case for per-task overhead), against a warm
  ``ProcessPoolExecutor(2).map(identity, items, chunksize=1)``.
  Target: <= 0.4x.

Every pool is started before timing: W4 measures dispatch, not start-up
(W7, ci/bench/warm.py, measures that a warm map pays no start-up).

    python ci/bench/dispatch.py [--rounds 5] [--tasks 10000] [--start fork]

Prints a table, then one JSON line with the ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import ParallelConfig, ParallelExecutor
from engine._context import package_versions

WORKERS = 2
TARGET_AUTO = 0.5
TARGET_CHUNK1 = 0.4


def identity(x: Any) -> Any:
    """The trivial task."""
    return x


def _versions() -> dict[str, str | None]:
    return package_versions(
        ("numpy", "numba", "sklearn", "joblib", "calibrated_explanations")
    )


def _timed(fn: Callable[[], Any], expected: list[Any]) -> float:
    started = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - started
    if list(result) != expected:
        msg = "a runner returned wrong results"
        raise AssertionError(msg)
    return elapsed


def _alternate(
    runners: dict[str, Callable[[], Any]], expected: list[Any], rounds: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    for runner in runners.values():  # warm-up round, not counted
        _timed(runner, expected)
    for _ in range(rounds):
        for name, runner in runners.items():
            times[name].append(_timed(runner, expected))
    return times


def main(argv: list[str] | None = None) -> int:
    """Run W4 and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--start", default=None, help="fork | spawn | forkserver")
    args = parser.parse_args(argv)
    import joblib  # the baseline, imported only here

    items = list(range(args.tasks))
    config = ParallelConfig(
        strategy="processes",
        max_workers=WORKERS,
        start_method=args.start,
        min_batch_size=1,
    )
    context = multiprocessing.get_context(args.start) if args.start else None
    with (
        ParallelExecutor(config) as ex,
        concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=context) as ppe,
        joblib.parallel_config(backend="loky", n_jobs=WORKERS),
    ):
        start_method = ex.map(identity, [0]) and ex.telemetry.summary()["start_method"]
        parallel = joblib.Parallel(n_jobs=WORKERS, batch_size="auto")
        delayed = joblib.delayed(identity)
        runners = {
            "ours auto": lambda: ex.map(identity, items),
            "joblib auto": lambda: parallel(delayed(i) for i in items),
            "ours chunk 1": lambda: ex.map(identity, items, chunk_size=1),
            "PPE chunksize=1": lambda: ppe.map(identity, items, chunksize=1),
        }
        times = _alternate(runners, items, args.rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio_auto = medians["ours auto"] / medians["joblib auto"]
    ratio_chunk1 = medians["ours chunk 1"] / medians["PPE chunksize=1"]
    print(
        f"W4: {args.tasks} trivial tasks, {WORKERS} workers, start method "
        f"{start_method}, {args.rounds} rounds (medians)"
    )
    print(f"{'runner':<18} {'median s':>10} {'us/task':>9}   all rounds (s)")
    for name, values in times.items():
        per_task = medians[name] / args.tasks * 1e6
        rounds = " ".join(f"{v:.3f}" for v in values)
        print(f"{name:<18} {medians[name]:>10.4f} {per_task:>9.1f}   {rounds}")
    print(f"auto / joblib   = {ratio_auto:.3f}  (target <= {TARGET_AUTO})")
    print(f"chunk 1 / PPE   = {ratio_chunk1:.3f}  (target <= {TARGET_CHUNK1})")
    report = {
        "workload": "W4",
        "tasks": args.tasks,
        "workers": WORKERS,
        "rounds": args.rounds,
        "start_method": start_method,
        "cpu_count": multiprocessing.cpu_count(),
        "versions": _versions(),
        "median_s": medians,
        "ratio_auto_vs_joblib": ratio_auto,
        "ratio_chunk1_vs_ppe": ratio_chunk1,
        "target_auto": TARGET_AUTO,
        "target_chunk1": TARGET_CHUNK1,
        "pass": ratio_auto <= TARGET_AUTO and ratio_chunk1 <= TARGET_CHUNK1,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
