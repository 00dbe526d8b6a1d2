"""ci/perf_check.py: noise-aware ratio comparison, pooling, confirmation."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[2] / "ci" / "perf_check.py"
_SPEC = importlib.util.spec_from_file_location("perf_check", _PATH)
assert _SPEC is not None
assert _SPEC.loader is not None
perf_check = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(perf_check)


def _report(seed: int, slow: float = 1.0, rounds: int = 5, noise: float = 0.1) -> Any:
    """W8 (noisy, 5 rounds) and W9 (steady, 25 rounds): auto at 0.5x its loop."""
    rng = random.Random(seed)
    workloads = {}
    for wid, n, spread in (("W8", rounds, noise), ("W9", 25, 0.005)):
        loop = [0.010 * math.exp(rng.gauss(0, spread)) for _ in range(n)]
        auto = [
            0.005 * slow * base / 0.010 * math.exp(rng.gauss(0, spread))
            for base in loop
        ]
        workloads[wid] = {
            "baseline": "loop",
            "samples_s": {"loop": loop, "auto": auto},
        }
    return perf_check.merge([{"workloads": workloads}])


def test_merge_pools_rounds_and_leaves_its_inputs_alone() -> None:
    first, second = _report(1), _report(2)
    before = json.dumps(first, sort_keys=True)
    merged = perf_check.merge([first, second])
    assert json.dumps(first, sort_keys=True) == before
    samples = merged["workloads"]["W8"]["samples_s"]
    assert samples["auto"] == (
        first["workloads"]["W8"]["samples_s"]["auto"]
        + second["workloads"]["W8"]["samples_s"]["auto"]
    )
    assert set(merged["ratios"]) == {"W8/auto", "W9/auto"}
    assert merged["ratios"]["W8/auto"] == pytest.approx(0.5, rel=0.15)


def test_log_ratio_is_the_paired_median_with_a_floor_on_its_error() -> None:
    report = {
        "workloads": {
            "W1": {
                "baseline": "loop",
                "samples_s": {"loop": [1.0, 2.0, 4.0], "auto": [0.5, 1.0, 2.0]},
            }
        }
    }
    middle, se = perf_check.log_ratio(report, "W1/auto")
    assert middle == pytest.approx(math.log(0.5))
    assert se == perf_check.SE_FLOOR  # identical per-round ratios: no spread
    without_rounds = {"ratios": {"W1/auto": 0.25}, "workloads": {}}
    middle, se = perf_check.log_ratio(without_rounds, "W1/auto")
    assert (middle, se) == (pytest.approx(math.log(0.25)), perf_check.SE_FLOOR)


def test_noise_alone_never_fails_but_a_real_slowdown_does() -> None:
    baseline = perf_check.merge([_report(seed) for seed in (10, 11, 12)])
    for seed in range(20, 40):  # 20 fresh runs of unchanged code
        _, regressions = perf_check.compare(_report(seed), baseline, 1.1)
        assert regressions == []
    _, regressions = perf_check.compare(_report(50, slow=1.3), baseline, 1.1)
    assert "W9/auto" in regressions  # steady rounds: 1.3x is clear
    _, regressions = perf_check.compare(_report(51, slow=3.0), baseline, 1.1)
    assert regressions == ["W8/auto", "W9/auto"]


def test_plain_ratio_rule_would_have_flagged_the_same_noise() -> None:
    # Why the margin exists: the same unchanged runs, compared as plain
    # ratios at 1.1x, flag the noisy workload.
    baseline = perf_check.merge([_report(seed) for seed in (10, 11, 12)])
    flagged = 0
    for seed in range(20, 40):
        fresh = _report(seed)
        change = fresh["ratios"]["W8/auto"] / baseline["ratios"]["W8/auto"]
        flagged += change > 1.1
    assert flagged >= 2


def test_confirmation_clears_a_fluke_and_keeps_a_real_regression(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    baseline = perf_check.merge([_report(seed) for seed in (10, 11, 12)])
    fluke = _report(60, slow=1.4)
    calls: list[str] = []

    def rerun(workloads: str) -> Any:
        calls.append(workloads)
        return _report(61 + len(calls))  # unchanged code measured again

    monkeypatch.setattr(perf_check, "run_ablate", rerun)
    _, still = perf_check.confirm(fluke, baseline, 1.1, ["W9/auto"], runs=2)
    assert still == []
    assert calls == ["W9"]

    def rerun_slow(workloads: str) -> Any:
        calls.append(workloads)
        return _report(70 + len(calls), slow=1.4)

    calls.clear()
    monkeypatch.setattr(perf_check, "run_ablate", rerun_slow)
    _, still = perf_check.confirm(fluke, baseline, 1.1, ["W9/auto"], runs=2)
    assert still == ["W9/auto"]
    assert calls == ["W9", "W9"]


def test_main_pools_fresh_reports_and_gates(tmp_path: Path) -> None:
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"run{seed}.json"
        path.write_text(json.dumps(_report(seed)))
        paths.append(str(path))
    baseline = tmp_path / "baseline.json"
    args = ["--baseline", str(baseline)]
    assert (
        perf_check.main([*args, "--update", "--fresh", paths[0], "--fresh", paths[1]])
        == 0
    )
    pooled = json.loads(baseline.read_text())
    assert len(pooled["workloads"]["W9"]["samples_s"]["auto"]) == 50
    steady = tmp_path / "steady.json"
    steady.write_text(json.dumps(_report(3)))
    assert perf_check.main([*args, "--fresh", str(steady)]) == 0
    slow = tmp_path / "slow.json"
    slow.write_text(json.dumps(_report(4, slow=2.0)))
    assert perf_check.main([*args, "--fresh", str(slow)]) == 1
    assert perf_check.main([*args, "--fresh", str(slow), "--report-only"]) == 0
