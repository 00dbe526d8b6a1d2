"""The W1-W3 CE baselines of ``engine/_workloads_ce.py`` run and agree.

CE's own ``instance_parallel`` plugin explains each chunk as its own batch, so
two fields that depend on batch composition differ from CE sequential
(CE-PLUGIN-NOTES.md section 5): ``prediction["__full_probabilities__"]`` holds
the chunk's probability matrix, not the whole batch's, and the rules'
``sampled_values`` come from the current-bin lookup under the index of the
instance's unique bound pair within its chunk. Everything else, feature
weights and predictions included, must be identical.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("calibrated_explanations")
pytest.importorskip("sklearn")

from engine._workloads_ce import (
    BASELINE,
    BATCH_DEPENDENT,
    CE_CONFIG_NAMES,
    OUR_CONFIGS,
    CEWorkload,
    build_case,
    ce_workloads,
    close_explainer,
    explanation_differences,
    is_identical,
    make_explainer,
    unavailable_reason,
)

# 12 rows: ce-tuned splits them into 2 chunks of 6 and ce-default into 8 + 4,
# so both really run CE's process pool (its gate is 8 instances).
N_ROWS = 12


@pytest.fixture(scope="module")
def w1_small() -> dict[str, Any]:
    return build_case("W1", quick=True, n_test=N_ROWS)


def _explain(state: dict[str, Any], name: str) -> tuple[Any, dict[str, Any]]:
    explainer = make_explainer(state, name)
    try:
        result = explainer.explain_factual(state["x_test"])
        executor = explainer.explainer.parallel_executor
        metrics = dict(executor.metrics.snapshot()) if executor is not None else {}
    finally:
        close_explainer(name, explainer)
    return result, metrics


def test_ce_sequential_and_tuned_explain_every_instance_and_agree(
    w1_small: dict[str, Any],
) -> None:
    sequential, _ = _explain(w1_small, "ce-sequential")
    tuned, metrics = _explain(w1_small, "ce-tuned")
    assert len(sequential.explanations) == N_ROWS
    assert len(tuned.explanations) == N_ROWS
    # Two chunks went through CE's pool: the tuned baseline is really parallel.
    assert metrics["submitted"] == 2
    diff = explanation_differences(sequential, tuned)
    assert is_identical(diff, ignore=BATCH_DEPENDENT), diff
    assert not any(key.startswith("feature_weights") for key in diff)
    assert not any(key.startswith("feature_predict") for key in diff)


def test_workload_runs_by_name_and_closes_ce_pools(w1_small: dict[str, Any]) -> None:
    workload = next(w for w in ce_workloads() if w.id == "W1")
    assert isinstance(workload, CEWorkload)
    assert workload.baseline == BASELINE
    assert workload.configs == CE_CONFIG_NAMES
    workload.state = w1_small
    try:
        sequential = workload.run("ce-sequential")
        default = workload.run("ce-default")
        assert workload.explainer("ce-default") is workload.explainer("ce-default")
        # One explainer per configuration: their last collections are not kept.
        for name in ("ce-sequential", "ce-default"):
            assert workload.explainer(name).explainer.latest_explanation is None
    finally:
        workload.close()
    assert not workload.explainers
    assert len(default.explanations) == N_ROWS
    diff = explanation_differences(sequential, default)
    assert is_identical(diff, ignore=BATCH_DEPENDENT), diff


def test_our_configs_are_available_or_say_why() -> None:
    for name in OUR_CONFIGS:
        reason = unavailable_reason(name)
        assert reason is None or (isinstance(reason, str) and reason)
    assert unavailable_reason("ce-sequential") is None
    assert "unknown" in str(unavailable_reason("nonsense"))
    with pytest.raises(ValueError, match="cannot run"):
        make_explainer({}, "nonsense")
