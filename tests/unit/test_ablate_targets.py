"""The ablation's target checks: auto against the best fixed strategy, paired."""

from __future__ import annotations

import math

from engine._ablate import DUEL_WITHIN, duel_configs, paired_ratio, targets


def _workload(samples: dict[str, list[float]]) -> dict[str, object]:
    medians = {
        name: sorted(values)[len(values) // 2] for name, values in samples.items()
    }
    return {"median_s": medians, "samples_s": samples}


def test_paired_ratio_cancels_drift_between_rounds() -> None:
    # The machine slows down 2x halfway through: auto and serial run back to
    # back in each round, and auto is 5 % slower in every round.
    serial = [1.0, 1.0, 2.0, 2.0, 2.0]
    auto = [value * 1.05 for value in serial]
    assert math.isclose(
        paired_ratio({"auto": auto, "serial": serial}, "auto", "serial"), 1.05
    )


def test_best_fixed_is_chosen_by_median_then_compared_round_by_round() -> None:
    # threads' median is lowest, but by luck: it had the quiet rounds. Round
    # by round, auto is as fast as threads; the ratio of medians said 1.2.
    results = {
        "W9": _workload(
            {
                "threads": [1.0, 1.0, 1.0, 1.5, 1.5],
                "auto": [1.0, 1.0, 1.2, 1.5, 1.5],
                "serial": [1.3, 1.3, 1.3, 1.3, 1.3],
            }
        )
    }
    out = targets(results)
    assert math.isclose(out["auto_vs_best_fixed"]["W9"], 1.0)
    assert out["auto_vs_best_fixed_ok"] is True


def test_a_consistently_slower_auto_fails_the_target() -> None:
    results = {
        "W9": _workload(
            {"serial": [1.0, 1.1, 0.9, 1.0, 1.0], "auto": [1.2, 1.32, 1.08, 1.2, 1.2]}
        )
    }
    out = targets(results)
    assert math.isclose(out["auto_vs_best_fixed"]["W9"], 1.2)
    assert out["auto_vs_best_fixed_ok"] is False


def test_reports_without_samples_fall_back_to_the_ratio_of_medians() -> None:
    results = {"W9": {"median_s": {"serial": 2.0, "auto": 2.4}}}
    assert math.isclose(targets(results)["auto_vs_best_fixed"]["W9"], 1.2)


def test_the_duel_decides_when_it_ran() -> None:
    # In the rounds, serial's lucky median made auto look 20 % slower; the
    # duel (fresh rounds, auto against the strategies near the best) shows
    # auto as fast as the best of them.
    results = {
        "W9": {
            **_workload(
                {
                    "serial": [1.0, 1.0, 1.0, 1.3, 1.3],
                    "threads": [1.1, 1.1, 1.1, 1.1, 1.1],
                    "auto": [1.2, 1.2, 1.2, 1.2, 1.2],
                }
            ),
            "duel_samples_s": {
                "auto": [1.0, 1.1, 1.0, 1.2],
                "serial": [1.1, 1.1, 1.1, 1.1],
                "threads": [1.0, 1.1, 1.0, 1.2],
            },
        }
    }
    out = targets(results)
    assert math.isclose(out["auto_vs_best_fixed"]["W9"], 1.0)


def test_a_slower_auto_fails_the_duel_too() -> None:
    results = {
        "W9": {
            **_workload({"serial": [1.0] * 5, "auto": [1.0] * 5}),
            "duel_samples_s": {"auto": [1.3, 1.2, 1.25], "serial": [1.0, 1.0, 1.0]},
        }
    }
    out = targets(results)
    assert math.isclose(out["auto_vs_best_fixed"]["W9"], 1.25)
    assert out["auto_vs_best_fixed_ok"] is False


def test_duel_takes_auto_and_the_fixed_strategies_near_the_best() -> None:
    samples = {
        "serial": [1.0, 1.0, 1.0],
        "threads": [DUEL_WITHIN * 0.99] * 3,
        "processes-fork": [DUEL_WITHIN * 1.01] * 3,
        "auto": [5.0, 5.0, 5.0],
        "ce-default": [0.5, 0.5, 0.5],  # a baseline, never a contender
    }
    assert duel_configs(samples) == ["auto", "serial", "threads"]
    assert duel_configs({"serial": [1.0]}) == []  # no auto: no duel


def test_quick_leaves_processes_spawn_out_of_the_ce_workloads_only() -> None:
    from engine._workloads import generic_workloads
    from engine._workloads_ce import QUICK_SKIPS, ce_workloads

    w1 = next(w for w in ce_workloads() if w.id == "W1")
    w4 = next(w for w in generic_workloads() if w.id == "W4")
    assert (
        w1.skip_reason("processes-spawn", quick=True) == QUICK_SKIPS["processes-spawn"]
    )
    assert w1.skip_reason("processes-spawn", quick=False) == w1.unavailable_reason(
        "processes-spawn"
    )
    assert w1.skip_reason("processes-fork", quick=True) == w1.unavailable_reason(
        "processes-fork"
    )
    assert w4.skip_reason("processes-spawn", quick=True) == w4.unavailable_reason(
        "processes-spawn"
    )
