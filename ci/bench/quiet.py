"""A warm process pool stays quiet after a map: the caller's next work runs at full speed.

After each map on a warm ``processes`` executor (2 workers), the caller
spins for ``--slots`` slots of 1 ms, counting loop iterations per slot;
after ``--idle`` seconds of sleep it spins the same way again (the pool long
idle). Both alternate for ``--rounds`` rounds (BENCH.md protocol: side by
side, medians per slot). Iterations the caller lost after a map, against
after the idle sleep, are CPU or GIL time the pool took from it: the
dispatcher's background thread taking over the idle pool 5 ms after a map
cost the caller ~1 % of those 20 ms (0.1 ms lost in the slot at 5-6 ms)
until that thread stayed parked when no run needs driving.

Target: no 1 ms slot loses more than 5 % of its iterations (before the fix
the slot at 5-6 ms lost 10-22 % in four runs, and the 20 ms 0.4-2.2 %; noise
per slot here is about +-2 %). The 20 ms total is reported too.

    python ci/bench/quiet.py [--rounds 150] [--slots 20] [--start fork]

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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import ParallelConfig, ParallelExecutor
from engine._context import package_versions
from engine._workloads import busy_ms  # W6's item: 1 ms of pure-Python work

WORKERS = 2
TARGET_WORST_SLOT_LOST = 0.05
SLOT_S = 0.001


def spin_slots(n_slots: int) -> list[int]:
    """Loop iterations the caller completes in each of ``n_slots`` 1 ms slots."""
    counts = []
    for _ in range(n_slots):
        end = time.perf_counter() + SLOT_S
        count = 0
        while time.perf_counter() < end:
            count += 1
        counts.append(count)
    return counts


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--slots", type=int, default=20)
    parser.add_argument("--idle", type=float, default=0.6)
    parser.add_argument("--start", default="fork", help="fork | spawn | forkserver")
    args = parser.parse_args(argv)
    if args.start not in multiprocessing.get_all_start_methods():
        print(f"start method {args.start!r} is not available here", file=sys.stderr)
        return 2
    items = list(range(5))
    config = ParallelConfig(
        strategy="processes",
        max_workers=WORKERS,
        min_batch_size=1,
        start_method=args.start,
    )
    after_map: list[list[int]] = []
    after_idle: list[list[int]] = []
    with ParallelExecutor(config) as executor:
        for _ in range(10):  # warm-up
            assert executor.map(busy_ms, items, chunk_size=1) == items
        for _ in range(args.rounds):
            executor.map(busy_ms, items, chunk_size=1)
            after_map.append(spin_slots(args.slots))
            time.sleep(args.idle)
            after_idle.append(spin_slots(args.slots))
    per_slot_map = [
        statistics.median(r[i] for r in after_map) for i in range(args.slots)
    ]
    per_slot_idle = [
        statistics.median(r[i] for r in after_idle) for i in range(args.slots)
    ]
    lost = 1.0 - sum(per_slot_map) / sum(per_slot_idle)
    slot_lost = [1.0 - m / i for m, i in zip(per_slot_map, per_slot_idle, strict=True)]
    worst = max(range(args.slots), key=slot_lost.__getitem__)
    print(f"{'slot (ms after)':<16}{'after a map':>14}{'after idle':>14}")
    for i in range(args.slots):
        print(f"{i:>3}-{i + 1:<12}{per_slot_map[i]:>14.0f}{per_slot_idle[i]:>14.0f}")
    print(f"iterations lost over {args.slots} ms after a map: {lost * 100:.2f} %")
    print(
        f"worst slot: {worst}-{worst + 1} ms, {slot_lost[worst] * 100:.1f} % lost "
        f"(target <= {TARGET_WORST_SLOT_LOST * 100:.0f} %)"
    )
    report = {
        "workload": "quiet-after-map",
        "rounds": args.rounds,
        "slots": args.slots,
        "workers": WORKERS,
        "start_method": args.start,
        "cpu_count": multiprocessing.cpu_count(),
        "versions": package_versions(("numpy", "numba")),
        "median_iterations_after_map": per_slot_map,
        "median_iterations_after_idle": per_slot_idle,
        "lost_fraction": lost,
        "worst_slot": worst,
        "worst_slot_lost_fraction": slot_lost[worst],
        "target_worst_slot_lost_fraction": TARGET_WORST_SLOT_LOST,
        "pass": slot_lost[worst] <= TARGET_WORST_SLOT_LOST,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
