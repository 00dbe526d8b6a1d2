"""W7 of BENCH.md: repeated maps on a warm executor pay no pool start-up.

One executor (``strategy="processes"``, 2 workers, spawn by default) is
started once; then a map of 10 small items on it alternates with the same
map in a plain serial loop, for ``--maps`` rounds after one warm-up round
(BENCH.md protocol: side by side, medians). Also reported: the first map on
a cold executor (start-up included), the cost a warm pool avoids.

Target: a warm map <= 5 ms over the serial map (median difference).

    python ci/bench/warm.py [--maps 20] [--items 10] [--start spawn]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import ParallelConfig, ParallelExecutor
from engine._context import package_versions

WORKERS = 2
TARGET_OVER_SERIAL_S = 0.005


def small_task(x: int) -> int:
    """About 20 microseconds of Python."""
    return sum(range(x, x + 1000))


def _versions() -> dict[str, str | None]:
    return package_versions(("numpy", "numba", "sklearn", "calibrated_explanations"))


def _serial(items: list[int]) -> list[int]:
    return [small_task(x) for x in items]


def main(argv: list[str] | None = None) -> int:
    """Run W7 and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=20)
    parser.add_argument("--items", type=int, default=10)
    parser.add_argument("--start", default="spawn", help="fork | spawn | forkserver")
    args = parser.parse_args(argv)
    items = list(range(args.items))
    expected = _serial(items)
    config = ParallelConfig(
        strategy="processes",
        max_workers=WORKERS,
        start_method=args.start,
        min_batch_size=1,
    )
    started = time.perf_counter()
    with ParallelExecutor(config) as ex:
        entered = time.perf_counter()
        first = ex.map(small_task, items)
        cold_s = time.perf_counter() - started
        first_map_s = time.perf_counter() - entered
        assert first == expected
        warm: list[float] = []
        serial: list[float] = []
        for round_index in range(args.maps + 1):
            t0 = time.perf_counter()
            result = ex.map(small_task, items)
            t1 = time.perf_counter()
            baseline = _serial(items)
            t2 = time.perf_counter()
            assert result == expected
            assert baseline == expected
            if round_index:  # round 0 is the warm-up
                warm.append(t1 - t0)
                serial.append(t2 - t1)
        telemetry: dict[str, Any] = ex.telemetry.summary()
    warm_median = statistics.median(warm)
    serial_median = statistics.median(serial)
    over_s = statistics.median([w - s for w, s in zip(warm, serial, strict=True)])
    print(
        f"W7: {args.maps} maps of {args.items} items, {WORKERS} workers, start method "
        f"{telemetry['start_method']} (medians)"
    )
    print(f"{'what':<34} {'ms':>9}")
    print(f"{'cold: start + first map':<34} {cold_s * 1e3:>9.1f}")
    print(f"{'first map after start':<34} {first_map_s * 1e3:>9.2f}")
    print(f"{'warm map':<34} {warm_median * 1e3:>9.2f}")
    print(f"{'serial loop, same items':<34} {serial_median * 1e3:>9.2f}")
    print(f"{'warm - serial (median of pairs)':<34} {over_s * 1e3:>9.2f}")
    print(f"target: warm - serial <= {TARGET_OVER_SERIAL_S * 1e3:.0f} ms")
    report = {
        "workload": "W7",
        "maps": args.maps,
        "items": args.items,
        "workers": WORKERS,
        "start_method": telemetry["start_method"],
        "cpu_count": multiprocessing.cpu_count(),
        "versions": _versions(),
        "cold_start_and_first_map_s": cold_s,
        "warm_map_s": warm_median,
        "serial_map_s": serial_median,
        "warm_over_serial_s": over_s,
        "ratio_warm_vs_cold": warm_median / cold_s,
        "target_over_serial_s": TARGET_OVER_SERIAL_S,
        "pass": over_s <= TARGET_OVER_SERIAL_S,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
