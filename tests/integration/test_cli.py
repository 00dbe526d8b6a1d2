"""``python -m engine info`` and ``python -m engine ablate``, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine._ablate import DUEL_MAX_ROUNDS, DUEL_MIN_ROUNDS, duel_configs
from engine._context import usable_cpu_count

ROOT = Path(__file__).resolve().parents[2]


def _run(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop(
        "CE_PARALLEL", None
    ) if env is None or "CE_PARALLEL" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=600,
        check=False,
    )


def test_info_rejects_bad_token() -> None:
    out = _run("info", env={"CE_PARALLEL": "workers=abc"})
    assert out.returncode != 0
    assert "workers=abc" in out.stderr


def test_info_off_shows_serial() -> None:
    out = _run("info", "--json", env={"CE_PARALLEL": "off"})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["config"]["strategy"] == "serial"
    assert info["forced_serial"] is True


def test_info_shows_exactly_what_was_asked() -> None:
    out = _run("info", "--json", env={"CE_PARALLEL": "threads,workers=2,min_batch=4"})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["config"]["strategy"] == "threads"
    assert info["config"]["max_workers"] == 2
    assert info["config"]["min_batch_size"] == 4
    assert info["environment"]["CE_PARALLEL"] == "threads,workers=2,min_batch=4"
    assert info["strategies"]["serial"] == "available"
    assert info["usable_cpus"] >= 1
    assert info["versions"]["numpy"]


def test_info_text_mentions_strategies() -> None:
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert "strategies:" in out.stdout
    assert "usable cpus:" in out.stdout


def test_ablate_rejects_unknown_workload() -> None:
    out = _run("ablate", "--quick", "--workloads", "W9")
    assert out.returncode == 2
    assert "W9" in out.stderr


@pytest.mark.slow
def test_ablate_quick_writes_report(tmp_path: Path) -> None:
    report = tmp_path / "ablate.json"
    out = _run("ablate", "--quick", "--workloads", "W6", "--json", str(report))
    assert out.returncode == 0, out.stderr
    data = json.loads(report.read_text())
    w6 = data["workloads"]["W6"]
    assert w6["baseline"] == "loop"
    assert w6["ratio_to_baseline"]["loop"] == 1.0
    assert {"serial", "threads", "auto"} <= set(w6["median_s"])
    assert "W6/auto" in data["ratios"]
    assert "w6_auto_vs_loop" in data["targets"]
    assert "round 5/5" in out.stderr  # progress is shown (BENCH.md: 5 rounds)
    assert "W6: duel auto vs " in out.stderr
    rounds = w6["rounds_by_config"]
    assert rounds["auto"] == rounds["serial"] == rounds["loop"] == w6["rounds"] >= 5
    # The duel: auto against the fixed strategies near the best, alternated.
    duel = w6["duel_samples_s"]
    assert duel.keys() == set(duel_configs(w6["samples_s"]))
    assert "auto" in duel
    assert len(duel) >= 2
    assert "loop" not in duel
    assert "ce-default" not in duel
    lengths = {len(values) for values in duel.values()}
    assert len(lengths) == 1
    duel_rounds = lengths.pop()
    assert DUEL_MIN_ROUNDS <= duel_rounds <= DUEL_MAX_ROUNDS
    # Every timed auto map of W6 (5 ms of known cost) is recorded: in the
    # caller, or split with the process pool its warm-up started once the
    # gains forgone paid for it (AutoPlanner.split; 2+ usable CPUs).
    ran = w6["auto_ran"]
    assert sum(ran.values()) == rounds["auto"] + duel_rounds
    allowed = {"caller", "processes/fork", "processes/forkserver", "processes/spawn"}
    assert set(ran) <= allowed, ran
    if usable_cpu_count() < 2:
        assert set(ran) == {"caller"}
    assert "auto's maps ran as: " in out.stdout
    assert data["meta"]["versions"]["python"]
