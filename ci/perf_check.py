"""Compare a fresh ``python -m engine ablate --quick --json`` with the baseline.

Ratios only (each configuration's time over its workload's baseline
configuration's time, in the same round), never absolute times, so a slower
or busier machine does not trip the gate by itself. A ratio is a regression
when it is more than ``--tolerance`` (default 1.1) times worse than the
baseline's *beyond its measurement noise*, and stays so when the workload is
measured again.

    python ci/perf_check.py                      # run ablate --quick 3x, compare, gate
    python ci/perf_check.py --fresh run.json     # compare an existing report
    python ci/perf_check.py --report-only --runs 1   # print, never fail (CI)
    python ci/perf_check.py --update --runs 5    # refresh ci/perf_baseline.json (pooled)
    python ci/perf_check.py --update --fresh a.json --fresh b.json   # from reports

Why the noise margin: on the 2-core reference machine a quick run has 5
rounds of W1-W5, and the median of 5 per-round ratios moves by 7-26 % (its
standard error, log scale 0.07-0.26). Comparing plain ratios at 1.1x flagged
5.7-7.4 of 38-46 ratios in every one of 30 pairs of runs of the same code
(runs 25-30, 2026-11-28). Each ratio now carries a standard error from its
own rounds (median absolute deviation), and the change must exceed the
tolerance by ``Z`` combined standard errors: W6's 25 stable rounds gate at
about 1.2x, W1-W5's noisy ones only at larger changes (the report prints
each ratio's threshold). A flagged workload is measured ``--confirm`` more
times and its rounds pooled before the gate fails.

Refresh the baseline after an intended performance change, on the reference
machine (2 cores), from several runs of the gate's own workloads (their
rounds are pooled; a ratio can depend on what ran before it in the process),
and commit it with the change that moved it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from engine._ablate import flat_ratios, median_ratios  # noqa: E402  (path first)

BASELINE = HERE / "perf_baseline.json"
# Ratios this small are dominated by timer noise and scheduling; a 10 %
# change of 0.5 % of the baseline means nothing.
NOISE_FLOOR = 0.02
# Combined standard errors a change must clear beyond the tolerance: with
# ~40 ratios a night, 3 keeps false alarms to ~5 % of nights before the
# confirmation runs (normal tail 0.13 % a ratio).
Z = 3.0
# Smallest standard error (log scale) assumed for a ratio: drift between
# runs that one run's rounds do not show (between-run SD of the steadiest
# W1-W5 ratios, runs 28-30: 0.03-0.04).
SE_FLOOR = 0.015
# Standard error of a median of n normal values from their MAD:
# sqrt(pi/2) * 1.4826 * MAD / sqrt(n).
_MEDIAN_SE = math.sqrt(math.pi / 2) * 1.4826
# Quick ablations a gate run pools (3: about 3 minutes for its workloads),
# and re-runs of a flagged workload before the gate fails.
RUNS = 3
CONFIRM_RUNS = 2


def run_ablate(workloads: str) -> dict:
    """Run ``python -m engine ablate --quick`` and return its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ablate.json"
        command = [
            sys.executable,
            "-m",
            "engine",
            "ablate",
            "--quick",
            "--workloads",
            workloads,
            "--json",
            str(out),
        ]
        subprocess.run(command, check=True)
        return json.loads(out.read_text())


def merge(reports: list[dict]) -> dict:
    """Pool the rounds of several reports of the same workloads into one.

    A round runs every configuration of a workload once, so the i-th samples
    of two configurations stay paired when runs are concatenated.
    """
    merged = json.loads(json.dumps(reports[0]))
    for report in reports[1:]:
        for wid, data in report.get("workloads", {}).items():
            workloads = merged.setdefault("workloads", {})
            if wid not in workloads:
                workloads[wid] = json.loads(json.dumps(data))
                continue
            into = workloads[wid]
            for name, values in data.get("samples_s", {}).items():
                into.setdefault("samples_s", {}).setdefault(name, []).extend(values)
    for data in merged.get("workloads", {}).values():
        samples = data.get("samples_s", {})
        if samples.get(data["baseline"]):
            data["ratio_to_baseline"] = median_ratios(samples, data["baseline"])[1]
    merged["ratios"] = flat_ratios(merged.get("workloads", {}))
    return merged


def log_ratio(report: dict, key: str) -> tuple[float, float] | None:
    """Median log ratio of ``key`` ("W4/auto") over its rounds, and its SE."""
    wid, name = key.split("/", 1)
    data = report.get("workloads", {}).get(wid, {})
    samples = data.get("samples_s", {})
    mine, base = samples.get(name), samples.get(data.get("baseline"))
    if mine and base and len(mine) == len(base):
        pairs = zip(mine, base, strict=True)
        logs = [math.log(a / b) for a, b in pairs if a > 0 and b > 0]
    else:  # a report without rounds: the ratio alone, noise unknown
        value = report.get("ratios", {}).get(key)
        logs = [math.log(value)] if value and value > 0 else []
    if not logs:
        return None
    middle = statistics.median(logs)
    mad = statistics.median(abs(x - middle) for x in logs)
    return middle, max(SE_FLOOR, _MEDIAN_SE * mad / math.sqrt(len(logs)))


def compare(
    fresh: dict, baseline: dict, tolerance: float
) -> tuple[list[str], list[str]]:
    """Return (report lines, regression keys)."""
    lines, regressions = [], []
    old = baseline.get("ratios", {})
    new = fresh.get("ratios", {})
    for key in sorted(set(old) | set(new)):
        if key not in new:
            lines.append(f"  {key:<26} baseline {old[key]:.4f}  fresh: not measured")
            continue
        if key not in old:
            lines.append(f"  {key:<26} fresh {new[key]:.4f}  (no baseline)")
            continue
        before, after = log_ratio(baseline, key), log_ratio(fresh, key)
        if before is None or after is None:
            lines.append(f"  {key:<26} not comparable ({old[key]}, {new[key]})")
            continue
        change = math.exp(after[0] - before[0])
        limit = tolerance * math.exp(Z * math.hypot(before[1], after[1]))
        flag = ""
        if change > limit and max(old[key], new[key]) >= NOISE_FLOOR:
            flag = "  REGRESSION"
            regressions.append(key)
        lines.append(
            f"  {key:<26} {math.exp(before[0]):9.4f} -> {math.exp(after[0]):9.4f}"
            f"  x{change:5.2f} (fails above x{limit:4.2f}){flag}"
        )
    return lines, regressions


def confirm(
    fresh: dict, baseline: dict, tolerance: float, keys: list[str], runs: int
) -> tuple[list[str], list[str]]:
    """Measure the workloads of ``keys`` ``runs`` more times, pooling rounds."""
    reports = [fresh]
    for attempt in range(runs):
        workloads = sorted({key.split("/", 1)[0] for key in keys})
        print(f"confirming {', '.join(keys)}: run {attempt + 1} of {runs}")
        reports.append(run_ablate(",".join(workloads)))
        lines, still = compare(merge(reports), baseline, tolerance)
        keys = [key for key in keys if key in still]
        if not keys:
            return lines, []
    return lines, keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fresh",
        action="append",
        help="an existing ablate --json report (repeat to pool several)",
    )
    parser.add_argument("--baseline", default=str(BASELINE))
    parser.add_argument("--tolerance", type=float, default=1.1)
    parser.add_argument("--workloads", default="W1,W4,W5,W6,W7")
    parser.add_argument("--report-only", action="store_true", help="never fail")
    parser.add_argument("--update", action="store_true", help="write the baseline")
    parser.add_argument(
        "--runs",
        type=int,
        default=RUNS,
        help="quick ablations to run and pool (more rounds, smaller noise)",
    )
    parser.add_argument(
        "--confirm",
        type=int,
        default=CONFIRM_RUNS,
        help="re-measure flagged workloads this many times before failing",
    )
    args = parser.parse_args(argv)

    if args.fresh:
        fresh = merge([json.loads(Path(path).read_text()) for path in args.fresh])
    else:
        fresh = merge([run_ablate(args.workloads) for _ in range(args.runs)])
    if args.update:
        Path(args.baseline).write_text(
            json.dumps(fresh, indent=2, sort_keys=True) + "\n"
        )
        print(f"baseline written to {args.baseline}")
        return 0
    baseline_path = Path(args.baseline)
    if not baseline_path.exists():
        print(f"no baseline at {baseline_path}; create one with --update")
        return 0 if args.report_only else 1
    baseline = json.loads(baseline_path.read_text())
    lines, regressions = compare(fresh, baseline, args.tolerance)
    if regressions and not args.report_only and not args.fresh and args.confirm:
        lines, regressions = confirm(
            fresh, baseline, args.tolerance, regressions, args.confirm
        )
    print(
        f"performance ratios, baseline -> fresh (tolerance {args.tolerance}x "
        f"beyond {Z:.0f} standard errors):"
    )
    print("\n".join(lines))
    if regressions:
        print(f"{len(regressions)} regression(s): {', '.join(regressions)}")
        if not args.report_only:
            return 1
        print("(report-only mode: not failing)")
    else:
        print("no regressions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
