"""Compare a fresh ``python -m engine ablate --quick --json`` with the baseline.

Ratios only (each workload's time over its baseline configuration's time,
measured side by side in one run), never absolute times, so a slower or
busier machine does not trip the gate by itself. A ratio more than
``--tolerance`` (default 1.1) times worse than the baseline's is a
regression.

    python ci/perf_check.py                      # run ablate --quick, compare, gate
    python ci/perf_check.py --fresh run.json     # compare an existing report
    python ci/perf_check.py --report-only        # print, never fail (CI on shared machines)
    python ci/perf_check.py --update             # refresh ci/perf_baseline.json

Refresh the baseline after an intended performance change, on the reference
machine (2 cores), and commit it with the change that moved it.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "perf_baseline.json"
# Ratios this small are dominated by timer noise and scheduling; a 10 %
# change of 0.5 % of the baseline means nothing.
NOISE_FLOOR = 0.02


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


def compare(
    fresh: dict, baseline: dict, tolerance: float
) -> tuple[list[str], list[str]]:
    """Return (report lines, regression lines)."""
    lines, regressions = [], []
    old = baseline.get("ratios", {})
    new = fresh.get("ratios", {})
    for key in sorted(set(old) | set(new)):
        if key not in new:
            lines.append(f"  {key:<28} baseline {old[key]:.4f}  fresh: not measured")
            continue
        if key not in old:
            lines.append(f"  {key:<28} fresh {new[key]:.4f}  (no baseline)")
            continue
        before, after = old[key], new[key]
        if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
            lines.append(f"  {key:<28} not comparable ({before}, {after})")
            continue
        change = after / before
        flag = ""
        if change > tolerance and max(before, after) >= NOISE_FLOOR:
            flag = f"  REGRESSION (> {tolerance:.2f}x)"
            regressions.append(f"{key}: {before:.4f} -> {after:.4f} ({change:.2f}x)")
        lines.append(f"  {key:<28} {before:8.4f} -> {after:8.4f}  x{change:5.2f}{flag}")
    return lines, regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", help="an existing ablate --json report")
    parser.add_argument("--baseline", default=str(BASELINE))
    parser.add_argument("--tolerance", type=float, default=1.1)
    parser.add_argument("--workloads", default="W1,W4,W5,W6,W7")
    parser.add_argument("--report-only", action="store_true", help="never fail")
    parser.add_argument("--update", action="store_true", help="write the baseline")
    args = parser.parse_args(argv)

    fresh = (
        json.loads(Path(args.fresh).read_text())
        if args.fresh
        else run_ablate(args.workloads)
    )
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
    print(f"performance ratios, baseline -> fresh (tolerance {args.tolerance}x):")
    print("\n".join(lines))
    if regressions:
        print(f"{len(regressions)} regression(s):")
        print("\n".join(f"  {line}" for line in regressions))
        if not args.report_only:
            return 1
        print("(report-only mode: not failing)")
    else:
        print("no regressions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
