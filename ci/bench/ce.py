"""W1-W3: our CE plugin against calibrated-explanations 1.0.2, side by side.

    python ci/bench/ce.py [--quick] [--workloads W1,W2,W3] [--rounds N]

Protocol (../shared/BENCH.md): every configuration of a workload is built
and run once to warm up (pools started, kernels compiled, explainers
calibrated; ``auto`` for up to 3 s, until repeated calls paid its pool
off), then each of ``--rounds`` rounds (at least 5) runs every
configuration once, in an order rotated per round; medians of the end-to-end
``explain_factual`` wall time are compared as ratios from this one run.

Configurations (``engine/_workloads_ce.py``): ``ce-sequential`` (CE's
default plugin, the baseline), ``ce-default`` (CE's own processes at its
fixed default, chunks of 8), ``ce-tuned`` (CE's best tuned parallel:
processes, 2 workers, ``instance_chunk_size=ceil(n/2)``), and our plugin
under ``serial``, ``threads``, ``processes-fork``, ``processes-spawn`` and
``auto``. "Ours with 2 workers" in the targets is ``processes-fork``.

Identity: the warm-up explanation of every configuration is compared with
``ce-sequential``'s: feature weights and feature predictions (predict, low,
high), the prediction (predict, low, high) and every ``get_rules()`` field
within 1e-9. CE's own parallel modes differ from CE sequential in the two
batch-dependent fields (``__full_probabilities__`` and the rules'
``sampled_values``); that is reported, not hidden.

Prints a human table, then as its last line one JSON object with the ratios.
When our plugin is not importable the CE baselines still run and the JSON
says why ours is missing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TWO_WORKERS = "processes-fork"
TARGET_VS_SEQUENTIAL = 5.0  # issue 5
TARGET_VS_TUNED = 4.0  # issue 5
TARGET_EFFICIENCY = 1.7  # BENCH.md targets table, W2 and W3 only
EFFICIENCY_WORKLOADS = ("W2", "W3")
MIN_ROUNDS = 5  # BENCH.md


def _use_checkout() -> None:
    """Import ``engine`` from this checkout when run from it, else installed."""
    if (ROOT / "engine" / "__init__.py").is_file() and str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _versions() -> dict[str, str | None]:
    from engine._context import package_versions

    return package_versions(
        ("engine", "numpy", "numba", "sklearn", "calibrated_explanations", "joblib")
    )


def _time(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(
    workload: Any, *, quick: bool, rounds: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Warm up, compare outputs, then time all configurations alternated."""
    from engine._workloads import warm_up
    from engine._workloads_ce import (
        BASELINE,
        BATCH_DEPENDENT,
        CE_CONFIGS,
        explanation_differences,
        is_identical,
    )

    skipped: dict[str, str] = {}
    configs = []
    for name in workload.configs:
        reason = workload.unavailable_reason(name)
        if reason is None:
            configs.append(name)
        else:
            skipped[name] = reason
    progress(f"{workload.id}: building data")
    workload.setup(quick)
    state = workload.state
    outputs: dict[str, Any] = {}
    samples: dict[str, list[float]] = {}
    try:
        for name in configs:
            progress(f"{workload.id}: warm-up {name}")
            try:
                outputs[name] = warm_up(name, lambda name=name: workload.run(name))
            except Exception as exc:
                if name in CE_CONFIGS:
                    raise
                # Our plugin is written concurrently: a failure is reported,
                # and the CE baselines still run.
                traceback.print_exc()
                skipped[name] = f"failed: {type(exc).__name__}: {exc}"
        configs = [name for name in configs if name in outputs]
        samples = {name: [] for name in configs}
        for round_index in range(rounds):
            shift = round_index % len(configs)
            for name in configs[shift:] + configs[:shift]:
                progress(f"{workload.id}: round {round_index + 1}/{rounds} {name}")
                samples[name].append(_time(lambda name=name: workload.run(name)))
    finally:
        workload.close()
    reference = outputs[BASELINE]
    differences: dict[str, dict[str, int]] = {}
    for name in configs:
        if name != BASELINE:
            progress(f"{workload.id}: comparing {name} with {BASELINE}")
            differences[name] = explanation_differences(reference, outputs[name])
    explained = {name: len(out.explanations) for name, out in outputs.items()}
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "title": workload.title,
        "n_test": len(state["x_test"]),
        "n_features": state["n_features"],
        "rounds": rounds,
        "median_s": medians,
        "explained": explained,
        "differences": differences,
        "identical_by_config": {
            name: is_identical(diff) for name, diff in differences.items()
        },
        "identical_except_batch_dependent": {
            name: is_identical(diff, ignore=BATCH_DEPENDENT)
            for name, diff in differences.items()
        },
        "skipped": skipped,
    }


def ratios(wid: str, data: dict[str, Any]) -> dict[str, Any]:
    """The issue-5 ratios of one workload (speed-ups: higher is faster)."""
    from engine._workloads_ce import OUR_CONFIGS

    medians = data["median_s"]

    def speedup(slow: str, fast: str) -> float | None:
        if slow in medians and fast in medians and medians[fast] > 0:
            return medians[slow] / medians[fast]
        return None

    ours = [name for name in OUR_CONFIGS if name in medians]
    out: dict[str, Any] = {
        "speedup_vs_ce_sequential": {
            name: speedup("ce-sequential", name)
            for name in ("ce-default", "ce-tuned", *ours)
            if name in medians
        },
        "speedup_vs_ce_tuned": {name: speedup("ce-tuned", name) for name in ours},
        "parallel_efficiency": speedup("serial", TWO_WORKERS),
        "parallel_efficiency_auto": speedup("serial", "auto"),
    }
    identical = data["identical_by_config"]
    ours_identical = [identical[name] for name in ours if name in identical]
    out["identical"] = all(ours_identical) if ours_identical else None
    out["ce_tuned_identical_except_batch_dependent"] = data[
        "identical_except_batch_dependent"
    ].get("ce-tuned")
    vs_sequential = out["speedup_vs_ce_sequential"].get(TWO_WORKERS)
    vs_tuned = out["speedup_vs_ce_tuned"].get(TWO_WORKERS)
    efficiency = out["parallel_efficiency"]
    out["targets"] = {
        "vs_ce_sequential_ge_5x": None
        if vs_sequential is None
        else vs_sequential >= TARGET_VS_SEQUENTIAL,
        "vs_ce_tuned_ge_4x": None if vs_tuned is None else vs_tuned >= TARGET_VS_TUNED,
        "efficiency_ge_1_7": None
        if efficiency is None or wid not in EFFICIENCY_WORKLOADS
        else efficiency >= TARGET_EFFICIENCY,
        "identical": out["identical"],
    }
    return out


def _fmt(value: float | None, suffix: str = "x") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def format_table(results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> str:
    """A human table: medians, speed-ups and identity per configuration."""
    lines = []
    for wid, data in results.items():
        ratio = summary[wid]
        lines.append(
            f"{wid} {data['title']}: {data['n_test']} instances, "
            f"{data['n_features']} features, {data['rounds']} rounds"
        )
        lines.append(
            f"  {'config':<16} {'median':>10} {'vs ce-seq':>10} "
            f"{'vs ce-tuned':>12}  identical to ce-sequential"
        )
        for name, seconds in sorted(data["median_s"].items(), key=lambda kv: kv[1]):
            vs_seq = ratio["speedup_vs_ce_sequential"].get(name)
            vs_tuned = ratio["speedup_vs_ce_tuned"].get(name)
            diff = data["differences"].get(name)
            if diff is None:
                same = "(reference)"
            elif not diff:
                same = "yes"
            else:
                same = "no: " + ", ".join(f"{k} {v}" for k, v in sorted(diff.items()))
            lines.append(
                f"  {name:<16} {seconds:9.3f}s {_fmt(vs_seq):>10} "
                f"{_fmt(vs_tuned):>12}  {same}"
            )
        by_reason: dict[str, list[str]] = {}
        for name, reason in data["skipped"].items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            lines.append(f"  skipped {', '.join(names)}: {reason}")
        lines.append(
            f"  parallel efficiency T(serial)/T({TWO_WORKERS}) "
            f"{_fmt(ratio['parallel_efficiency'])}, T(serial)/T(auto) "
            f"{_fmt(ratio['parallel_efficiency_auto'])}; targets {ratio['targets']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table, then the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="explain 12/12/10 instances, not all"
    )
    parser.add_argument("--workloads", default="W1,W2,W3", help="e.g. W1,W3")
    parser.add_argument(
        "--rounds",
        type=int,
        default=MIN_ROUNDS,
        help=f"timed rounds after the warm-up (BENCH.md: at least {MIN_ROUNDS})",
    )
    args = parser.parse_args(argv)
    _use_checkout()
    from engine._context import usable_cpu_count
    from engine._workloads_ce import CASES, ce_workloads, plugin_unavailable_reason

    ids = [part.strip().upper() for part in args.workloads.split(",") if part.strip()]
    unknown = sorted(set(ids) - set(CASES))
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; known: {', '.join(CASES)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.rounds < MIN_ROUNDS:
        print(
            f"warning: {args.rounds} rounds is below BENCH.md's {MIN_ROUNDS}",
            file=sys.stderr,
        )
    started = time.perf_counter()

    def progress(message: str) -> None:
        elapsed = time.perf_counter() - started
        print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    results = {}
    for workload in ce_workloads():
        if workload.id in ids:
            results[workload.id] = measure(
                workload, quick=args.quick, rounds=args.rounds, progress=progress
            )
    summary = {wid: ratios(wid, data) for wid, data in results.items()}
    plugin_reason = plugin_unavailable_reason()
    report = {
        "bench": "ce",
        "quick": args.quick,
        "rounds": args.rounds,
        "meta": {
            "cpus": usable_cpu_count(),
            "os_cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "versions": _versions(),
            "workers": 2,
            "start_methods": {
                # CE's ProcessPoolExecutor takes the platform default context.
                "ce-default": multiprocessing.get_start_method(allow_none=False),
                "ce-tuned": multiprocessing.get_start_method(allow_none=False),
                "processes-fork": "fork",
                "processes-spawn": "spawn",
                "auto": "chosen by auto",
            },
            "elapsed_s": time.perf_counter() - started,
        },
        "ours_available": plugin_reason is None,
        "ours_unavailable_reason": plugin_reason,
        "workloads": {
            wid: {
                "n_test": data["n_test"],
                "n_features": data["n_features"],
                "median_s": data["median_s"],
                "differences": data["differences"],
                "skipped": data["skipped"],
                **summary[wid],
            }
            for wid, data in results.items()
        },
    }
    print(format_table(results, summary))
    if plugin_reason is not None:
        print(f"ours: not available ({plugin_reason}); CE baselines only")
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
