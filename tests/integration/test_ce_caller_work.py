"""The caller's share of a CE call, cut without changing what CE returns.

ScoreMemo: CE's repeated model calls on a batch, scored once. The deferred
snapshot: one deep copy of the explainer per call instead of two. The
oracle is CE 1.0.2's own sequential path on an identical explainer.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from _ce_compare import assert_same_explanations

pytest.importorskip("calibrated_explanations")
pytest.importorskip("sklearn")

from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split

from engine import ParallelConfig
from engine.integrations.calibrated_explanations import disable, enable
from engine.integrations.calibrated_explanations._ce_state import ScoreMemo

N_TEST = 12


class CountingForest(RandomForestClassifier):
    """A forest that records the shape of every batch it scores (this process)."""

    def predict_proba(self, x: Any) -> Any:
        calls = self.__dict__.setdefault("calls", [])
        calls.append((threading.get_ident(), np.shape(x)))
        return super().predict_proba(x)


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(
        x, y, test_size=100, random_state=0, stratify=y
    )
    x_proper, x_cal, y_proper, y_cal = train_test_split(
        x_train, y_train, test_size=150, random_state=0, stratify=y_train
    )
    return {
        "x_proper": x_proper,
        "y_proper": y_proper,
        "x_cal": x_cal,
        "y_cal": y_cal,
        "x_test": x_test[:N_TEST],
    }


def _explainer(data: dict[str, Any]) -> Any:
    from calibrated_explanations import WrapCalibratedExplainer

    model = CountingForest(n_estimators=10, random_state=0, n_jobs=1)
    model.fit(data["x_proper"], data["y_proper"])
    wrapper = WrapCalibratedExplainer(model)
    wrapper.calibrate(data["x_cal"], data["y_cal"])
    return wrapper


def _caller_calls(wrapper: Any) -> list[tuple[int, ...]]:
    me = threading.get_ident()
    return [shape for ident, shape in wrapper.learner.calls if ident == me]


def test_the_caller_scores_the_batch_once(data: dict[str, Any]) -> None:
    # CE's sequential path scores the batch twice (predictions, then
    # __full_probabilities__) and the plugin's bridge one row; with the memo
    # the caller asks the model for the batch once, and the explanations
    # stay identical to CE's.
    x = data["x_test"]
    expected_wrapper = _explainer(data)
    expected = expected_wrapper.explain_factual(x)
    batch_shape = x.shape
    assert _caller_calls(expected_wrapper).count(batch_shape) == 2

    wrapper = _explainer(data)
    enable(wrapper, ParallelConfig(strategy="serial", min_batch_size=1))
    try:
        wrapper.learner.calls.clear()
        actual = wrapper.explain_factual(x)
        caller = _caller_calls(wrapper)
        assert caller.count(batch_shape) == 1
        assert (1, x.shape[1]) not in caller  # the bridge's row came from the memo
        assert_same_explanations(actual, expected)
        # Nothing stays installed on CE's calibrator after the call.
        learner = wrapper.explainer.interval_learner
        assert not getattr(learner._predict_proba, "score_memo", False)
    finally:
        disable(wrapper)


class _Calibrator:
    """Stands for CE's VennAbers: scores through an instance attribute."""

    def __init__(self, score: Any) -> None:
        self._predict_proba = score


class _Explainer:
    def __init__(self, score: Any) -> None:
        self.interval_learner = _Calibrator(score)


def _counting_score() -> tuple[Any, list[int]]:
    seen: list[int] = []

    def score(rows: np.ndarray) -> np.ndarray:
        seen.append(len(rows))
        return np.column_stack([rows.sum(axis=1), -rows.sum(axis=1)])

    return score, seen


def test_only_the_batch_and_the_bridge_row_are_served() -> None:
    score, seen = _counting_score()
    explainer = _Explainer(score)
    x = np.arange(12.0).reshape(4, 3)
    memo = ScoreMemo(x)
    with memo.installed(explainer):
        learner = explainer.interval_learner
        first = learner._predict_proba(x)
        again = learner._predict_proba(x)
        other = learner._predict_proba(x + 1)
        row = learner._predict_proba(x[:1].copy())  # not a bridge window
    assert seen == [4, 4, 1]
    np.testing.assert_array_equal(first, score(x))
    np.testing.assert_array_equal(again, first)
    assert again is not first  # a copy: CE may write into what it gets
    np.testing.assert_array_equal(other, score(x + 1))
    np.testing.assert_array_equal(row, score(x[:1]))
    with memo.installed(explainer, bridge=True):
        seen.clear()
        bridged = explainer.interval_learner._predict_proba(x[:1].copy())
        different = explainer.interval_learner._predict_proba(x[1:2].copy())
    assert seen == [1]  # only the row that is not the first was scored
    np.testing.assert_array_equal(bridged, score(x)[:1])
    np.testing.assert_array_equal(different, score(x[1:2]))
    assert explainer.interval_learner._predict_proba is score


def test_nested_or_concurrent_installs_leave_the_calibrator_as_found() -> None:
    score, seen = _counting_score()
    explainer = _Explainer(score)
    x, y = np.ones((3, 2)), np.zeros((3, 2))
    first, second = ScoreMemo(x), ScoreMemo(y)
    with first.installed(explainer):
        wrapper = explainer.interval_learner._predict_proba
        with second.installed(explainer):
            # The second memo stays out of the way: the first one is in place.
            assert explainer.interval_learner._predict_proba is wrapper
            explainer.interval_learner._predict_proba(y)
            explainer.interval_learner._predict_proba(y)
        assert explainer.interval_learner._predict_proba is wrapper
    assert explainer.interval_learner._predict_proba is score
    assert seen == [3, 3]  # y was not memoised: its memo was never installed


def test_a_scoring_function_taking_bins_is_left_alone() -> None:
    # CE passes Mondrian bins to a custom predict function that accepts them;
    # the memo cannot tell batches of different bins apart, so it stays out.
    def score(rows: np.ndarray, bins: Any = None) -> np.ndarray:
        return rows

    explainer = _Explainer(score)
    with ScoreMemo(np.ones((2, 2))).installed(explainer):
        assert explainer.interval_learner._predict_proba is score
    regression = type("Regressor", (), {"interval_learner": object()})()
    with ScoreMemo(np.ones((2, 2))).installed(regression):
        pass  # a calibrator without _predict_proba: nothing to do, no error


def test_an_error_inside_restores_the_calibrator() -> None:
    score, _ = _counting_score()
    explainer = _Explainer(score)
    with pytest.raises(RuntimeError), ScoreMemo(np.ones((2, 2))).installed(explainer):
        raise RuntimeError("boom")
    assert explainer.interval_learner._predict_proba is score


def _copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count deep copies of CalibratedExplainer (CE's snapshot step)."""
    from calibrated_explanations.core.calibrated_explainer import CalibratedExplainer

    copies: list[int] = []
    original = CalibratedExplainer.__deepcopy__

    def counting(self: Any, memo: dict[int, Any]) -> Any:
        if id(self) not in memo:
            copies.append(id(self))
        return original(self, memo)

    monkeypatch.setattr(CalibratedExplainer, "__deepcopy__", counting)
    return copies


def _snapshot_state(collection: Any) -> dict[str, Any]:
    """The final collection's explainer snapshot, as comparable values."""
    from calibrated_explanations.core.calibrated_explainer import CalibratedExplainer
    from calibrated_explanations.explanations.explanations import (
        FrozenCalibratedExplainer,
    )

    frozen = collection.calibrated_explainer
    assert type(frozen) is FrozenCalibratedExplainer
    inner = frozen.explainer
    assert type(inner) is FrozenCalibratedExplainer  # CE's from_batch nesting
    snapshot = inner.explainer
    assert type(snapshot) is CalibratedExplainer
    state = vars(snapshot)
    return {
        "keys": sorted(state),
        "mode": state.get("_last_explanation_mode", "absent"),
        "latest": state.get("latest_explanation"),
        "x_cal": np.array(snapshot.x_cal),
        "probabilities": snapshot.learner.predict_proba(np.array(snapshot.x_cal)),
    }


def test_one_snapshot_copy_per_call_and_the_same_snapshot(
    data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # CE's sequential path copies the explainer twice per call (its template
    # collection, then from_batch); the plugin once, at from_batch time, from
    # the attributes as CE's first copy would have seen them.
    x = data["x_test"]
    copies = _copies(monkeypatch)
    expected_wrapper, wrapper = _explainer(data), _explainer(data)
    enable(wrapper, ParallelConfig(strategy="serial", min_batch_size=1))
    try:
        for call in range(2):  # the first call has no earlier explanation mode
            copies.clear()
            expected = expected_wrapper.explain_factual(x)
            assert len(copies) == 2
            copies.clear()
            actual = wrapper.explain_factual(x)
            assert len(copies) == 1
            assert_same_explanations(actual, expected)
            want, got = _snapshot_state(expected), _snapshot_state(actual)
            assert got["keys"] == want["keys"]
            assert got["mode"] == want["mode"], call
            assert got["latest"] is None
            assert want["latest"] is None
            np.testing.assert_array_equal(got["x_cal"], want["x_cal"])
            np.testing.assert_array_equal(got["probabilities"], want["probabilities"])
            # A snapshot, not the live explainer: the live one moved on.
            live = wrapper.explainer
            snapshot = actual.calibrated_explainer.explainer.explainer
            assert snapshot is not live
            assert snapshot.learner is not live.learner
            assert live.latest_explanation is actual
        # An alternative explanation in between rebinds the live explainer's
        # last mode: CE's snapshot of the next factual call still says
        # "alternative", as it was when CE copied it.
        expected_wrapper.explore_alternatives(x[:2])
        wrapper.explore_alternatives(x[:2])
        expected = expected_wrapper.explain_factual(x)
        actual = wrapper.explain_factual(x)
        want, got = _snapshot_state(expected), _snapshot_state(actual)
        assert want["mode"] == "alternative"
        assert got["mode"] == want["mode"]
        assert wrapper.explainer.last_explanation_mode == "factual"
    finally:
        disable(wrapper)


def test_the_live_explainer_is_left_as_the_call_left_it(data: dict[str, Any]) -> None:
    # The snapshot briefly restores the attributes CE's own copy would have
    # seen; afterwards the live explainer holds exactly what the call set.
    wrapper = _explainer(data)
    enable(wrapper, ParallelConfig(strategy="serial", min_batch_size=1))
    try:
        result = wrapper.explain_factual(data["x_test"])
        live = wrapper.explainer
        assert live.last_explanation_mode == "factual"
        assert live.latest_explanation is result
        assert not any(
            type(value).__name__ == "_SnapshotOnCopy" for value in vars(live).values()
        )
    finally:
        disable(wrapper)
