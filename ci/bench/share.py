"""W6 on a warm pool: a tiny map split between the caller and the pool.

A map under ``engine.auto.MIN_PARALLEL_WORK_S`` never gets a pool of its
own, but once an executor's process pool is warm, auto may split it: the
caller runs its share while the pool runs the rest (``AutoPlanner.split``).
Side by side, alternated, medians (BENCH.md protocol), over W6's map (5
items of 1 ms of pure-Python work, ``engine._workloads.busy_ms``):

- ``loop``: a plain list comprehension (W6's baseline);
- ``auto split``: auto on an executor whose process pool is warm;
- ``warm pool``: the whole map on a warm ``processes`` executor;
- ``round trip``: one chunk of 2 trivial items on the warm pool, the cost
  ``auto.SHARE_ROUND_TRIP_S`` stands for.

Targets: auto split <= 1.05x the loop (W6) and <= 1.1x the warm pool.

    python ci/bench/share.py [--rounds 200] [--start fork]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import ParallelConfig, ParallelExecutor, _planner
from engine._context import package_versions
from engine._workloads import busy_ms, identity, last_run_id, strategies_ran

WORKERS = 2
ITEMS = list(range(5))


def _versions() -> dict[str, str | None]:
    return package_versions(("numpy", "numba"))


def _timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--start", default="fork", help="fork | spawn | forkserver")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error("--rounds must be >= 5 (BENCH.md)")
    base = {"max_workers": WORKERS, "start_method": args.start, "min_batch_size": 1}
    auto = ParallelExecutor(ParallelConfig(strategy="auto", **base))
    pool = ParallelExecutor(ParallelConfig(strategy="processes", **base))
    with auto, pool:
        # Warm both: the pool by a map; auto by a map of known cost with its
        # pool's start-up counted as paid, so the next maps split.
        pool.map(busy_ms, ITEMS)
        _planner.STARTUP_S[("processes", args.start)] = 0.0
        for _ in range(3):
            auto.map(busy_ms, ITEMS)
        reason = auto.telemetry.runs[-1].reason
        if auto.telemetry.runs[-1].strategy != "processes":
            print(f"auto does not split here: {reason}")
            return 1
        since = last_run_id(auto)
        runs: dict[str, Callable[[], Any]] = {
            "loop": lambda: [busy_ms(x) for x in ITEMS],
            "auto split": lambda: auto.map(busy_ms, ITEMS),
            "warm pool": lambda: pool.map(busy_ms, ITEMS),
            "round trip": lambda: pool.map(identity, [0, 1], chunk_size=2),
        }
        samples: dict[str, list[float]] = {name: [] for name in runs}
        for round_index in range(args.rounds + 1):
            for name, run in runs.items():
                took = _timed(run)
                if round_index:  # round 0 is the warm-up
                    samples[name].append(took)
        ran = strategies_ran(auto, since)
    medians = {name: statistics.median(values) for name, values in samples.items()}

    def paired(name: str, other: str) -> float:
        pairs = zip(samples[name], samples[other], strict=True)
        return statistics.median(a / b for a, b in pairs)

    vs_loop = paired("auto split", "loop")
    vs_pool = paired("auto split", "warm pool")
    print(
        f"W6 on a warm pool: 5 items of 1 ms, {WORKERS} workers, start method "
        f"{args.start}, {args.rounds} rounds (medians)"
    )
    print(f"auto's reason: {reason}")
    print(f"auto's timed maps ran as: {ran}")
    print(f"{'what':<12} {'ms':>8}")
    for name, value in medians.items():
        print(f"{name:<12} {value * 1e3:>8.3f}")
    print(f"auto split / loop      {vs_loop:.3f}  (target <= 1.05)")
    print(f"auto split / warm pool {vs_pool:.3f}  (target <= 1.1)")
    report = {
        "workload": "W6-split",
        "rounds": args.rounds,
        "workers": WORKERS,
        "start_method": args.start,
        "cpu_count": multiprocessing.cpu_count(),
        "versions": _versions(),
        "median_s": medians,
        "auto_split_vs_loop": vs_loop,
        "auto_split_vs_warm_pool": vs_pool,
        "round_trip_s": medians["round trip"],
        "auto_ran": ran,
        "pass": vs_loop <= 1.05 and vs_pool <= 1.1,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
