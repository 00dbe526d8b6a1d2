"""W5 of BENCH.md: a 100 MiB array read by tasks on 2 workers, shared vs pickled.

Each task sums one slice of a 100 MiB float64 array. Baseline: the stdlib
``ProcessPoolExecutor`` with the array pickled into every task (what
calibrated-explanations does with its explainer today). Ours: the array goes
to shared memory once per run (``PayloadStore.dumps`` replaces it by a
``PayloadRef``) and each worker attaches a zero-copy view once. Both use the
same warm pool; A and B alternate for ``--rounds`` rounds after a warm-up, and
the medians are compared as ratios measured side by side (BENCH.md protocol).

Rows: ``pickled`` (baseline), ``shared`` (cold: create the store, copy the
array in, map, unlink; the headline figure) and ``shared-warm`` (the array is
already shared and attached, as on a second ``map`` of one executor).

    python ci/bench/payload.py [--rounds 5] [--tasks 4] [--mib 100] [--start fork]

Prints a table, then one JSON line with the ratios (targets: bytes pickled per
task <= 5 % of the baseline, wall <= 0.3x).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import payload

WORKERS = 2
TARGET_BYTES_RATIO = 0.05
TARGET_WALL_RATIO = 0.3

Bounds = list[tuple[int, int]]
Runner = Callable[[np.ndarray, Bounds], tuple[list[float], int]]


def sum_slice(x: np.ndarray, lo: int, hi: int) -> float:
    """The task: sum one slice."""
    return float(x[lo:hi].sum())


# -- worker side of "ours" until the engine's process strategy exists ---------

_current_store: str | None = None


def run_blob(store_id: str, blob: bytes) -> float:
    """Unpickle a task made by ``PayloadStore.dumps`` and run it."""
    global _current_store
    if store_id != _current_store:
        # A new store: the previous one was closed, so drop its mappings
        # (the engine's workers get this from the supervisor).
        payload.detach_all()
        _current_store = store_id
    fn, args = payload.loads(blob)
    return fn(*args)


def _pickled_size(obj: Any) -> int:
    return len(ForkingPickler.dumps(obj))


# -- the two runners ----------------------------------------------------------


@contextlib.contextmanager
def open_baseline(pool: ProcessPoolExecutor) -> Iterator[Runner]:
    """Baseline: the array is pickled into every task."""

    def run(x: np.ndarray, bounds: Bounds) -> tuple[list[float], int]:
        futures = [pool.submit(sum_slice, x, lo, hi) for lo, hi in bounds]
        return [f.result() for f in futures], 0

    yield run


@contextlib.contextmanager
def open_shared(pool: ProcessPoolExecutor, *, warm: bool) -> Iterator[Runner]:
    """Ours: one PayloadStore per run (cold) or per session (warm).

    This is the one function to swap for the engine once the process
    strategy exists::

        with ParallelExecutor(ParallelConfig(strategy="processes",
                                             max_workers=WORKERS)) as ex:
            def run(x, bounds):
                out = ex.map(functools.partial(sum_slice_of, x), bounds)
                return out, ex.telemetry.summary()["bytes_pickled"] // len(bounds)
            yield run
    """
    session = payload.PayloadStore() if warm else None
    try:

        def run(x: np.ndarray, bounds: Bounds) -> tuple[list[float], int]:
            store = session or payload.PayloadStore()
            try:
                blobs = [store.dumps((sum_slice, (x, lo, hi))) for lo, hi in bounds]
                store_id = store.segment_names()[0]
                results = list(pool.map(run_blob, [store_id] * len(blobs), blobs))
                return results, max(
                    _pickled_size((run_blob, (store_id, b))) for b in blobs
                )
            finally:
                if session is None:
                    store.close()

        yield run
    finally:
        if session is not None:
            session.close()


# -- measurement --------------------------------------------------------------


def _environment(start: str, tasks: int, mib: int) -> dict[str, Any]:
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("numba", "cloudpickle"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {
        "cpu_count": os.cpu_count(),
        **versions,
        "start_method": start,
        "workers": WORKERS,
        "tasks_per_run": tasks,
        "array_mib": mib,
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--mib", type=int, default=100)
    default_start = "fork" if sys.platform.startswith("linux") else "spawn"
    parser.add_argument("--start", default=default_start, choices=["fork", "spawn"])
    args = parser.parse_args(argv)

    x = np.random.default_rng(0).random(args.mib * (1 << 20) // 8)
    edges = np.linspace(0, x.size, args.tasks + 1).astype(int)
    bounds = [(int(lo), int(hi)) for lo, hi in itertools.pairwise(edges)]
    expected = [sum_slice(x, lo, hi) for lo, hi in bounds]
    baseline_bytes = _pickled_size((sum_slice, (x, *bounds[0])))
    payload.ensure_tracker()  # before the fork pool: one tracker for all

    ctx = multiprocessing.get_context(args.start)
    times: dict[str, list[float]] = {"pickled": [], "shared": [], "shared-warm": []}
    task_bytes: dict[str, int] = {"pickled": baseline_bytes}
    with (
        ProcessPoolExecutor(WORKERS, mp_context=ctx) as pool,
        open_baseline(pool) as pickled,
        open_shared(pool, warm=False) as shared,
        open_shared(pool, warm=True) as warm,
    ):
        runners = {"pickled": pickled, "shared": shared, "shared-warm": warm}
        order = list(runners)
        for round_no in range(args.rounds + 1):  # round 0 warms up
            for name in order if round_no % 2 else order[::-1]:
                started = time.perf_counter()
                results, nbytes = runners[name](x, bounds)
                elapsed = time.perf_counter() - started
                if results != expected:
                    msg = f"{name} returned wrong sums in round {round_no}"
                    raise SystemExit(msg)
                if name != "pickled":
                    task_bytes[name] = nbytes
                if round_no:
                    times[name].append(elapsed)
            print(f"round {round_no} done", file=sys.stderr, flush=True)

    env = _environment(args.start, args.tasks, args.mib)
    medians = {name: statistics.median(samples) for name, samples in times.items()}
    base = medians["pickled"]
    print("W5: 100 MiB float64, tasks sum slices; shared memory vs pickling")
    print("  " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(
        f"{'runner':<13}{'median ms':>11}{'min ms':>9}{'max ms':>9}"
        f"{'bytes/task':>13}{'wall ratio':>12}{'bytes ratio':>13}"
    )
    for name, samples in times.items():
        print(
            f"{name:<13}{medians[name] * 1e3:>11.1f}{min(samples) * 1e3:>9.1f}"
            f"{max(samples) * 1e3:>9.1f}{task_bytes[name]:>13,}"
            f"{medians[name] / base:>12.4f}{task_bytes[name] / baseline_bytes:>13.2e}"
        )
    result = {
        "workload": "W5",
        "wall_ratio": round(medians["shared"] / base, 4),
        "wall_ratio_warm": round(medians["shared-warm"] / base, 4),
        "bytes_per_task_ratio": task_bytes["shared"] / baseline_bytes,
        "median_ms": {k: round(v * 1e3, 2) for k, v in medians.items()},
        "bytes_per_task": task_bytes,
        "rounds": args.rounds,
        **env,
    }
    result["targets_met"] = (
        result["wall_ratio"] <= TARGET_WALL_RATIO
        and result["bytes_per_task_ratio"] <= TARGET_BYTES_RATIO
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
