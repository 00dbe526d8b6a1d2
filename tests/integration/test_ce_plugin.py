"""The calibrated-explanations plugin end to end: enable(), every strategy.

The oracle is CE 1.0.2's own default path (``core.explanation.factual.sequential``)
on the same explainer: every explanation's feature weights and predictions
(predict/low/high) and its rules must be equal.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from _ce_compare import assert_same_explanations

pytest.importorskip("calibrated_explanations")
pytest.importorskip("sklearn")

from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split

from engine import ConfigError, FallbackWarning, ParallelConfig
from engine.integrations.calibrated_explanations import (
    PLUGIN_ID,
    disable,
    enable,
    executor_of,
    is_enabled,
)

N_TEST = 24


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(
        x, y, test_size=100, random_state=0, stratify=y
    )
    x_proper, x_cal, y_proper, y_cal = train_test_split(
        x_train, y_train, test_size=150, random_state=0, stratify=y_train
    )
    model = RandomForestClassifier(n_estimators=20, random_state=0, n_jobs=1)
    model.fit(x_proper, y_proper)
    return {"model": model, "x_cal": x_cal, "y_cal": y_cal, "x_test": x_test[:N_TEST]}


def _explainer(data: dict[str, Any]) -> Any:
    from calibrated_explanations import WrapCalibratedExplainer

    wrapper = WrapCalibratedExplainer(data["model"])
    wrapper.calibrate(data["x_cal"], data["y_cal"])
    return wrapper


def _assert_same(expected: Any, actual: Any) -> None:
    # Every attribute of every explanation, bit for bit (tests/_ce_compare.py).
    assert_same_explanations(actual, expected)


def test_every_strategy_gives_ce_identical_explanations(
    data: dict[str, Any], strategy_fields: dict[str, Any]
) -> None:
    wrapper = _explainer(data)
    expected = wrapper.explain_factual(data["x_test"])
    enable(wrapper, ParallelConfig(**{**strategy_fields, "min_batch_size": 1}))
    try:
        manager = wrapper.explainer.plugin_manager
        for _ in range(2):  # the second call runs on a warm executor
            with warnings.catch_warnings():
                warnings.simplefilter("error", FallbackWarning)
                actual = wrapper.explain_factual(data["x_test"])
            _assert_same(expected, actual)
        assert manager.explanation_plugin_identifiers["factual"] == PLUGIN_ID
        summary = executor_of(wrapper).telemetry.summary()
        assert summary["items"] > 0
        assert summary["fallbacks"] == []
        if strategy_fields["strategy"] != "serial":
            assert summary["strategy"] == strategy_fields["strategy"]
    finally:
        disable(wrapper)
    assert not is_enabled(wrapper)


def test_unsupported_request_falls_back_to_ce(data: dict[str, Any]) -> None:
    x = data["x_test"][:6]
    x_int = np.rint(x).astype(np.int64)  # the kernels take float64 only
    reference = _explainer(data).explain_factual(x_int)
    wrapper = _explainer(data)
    enable(wrapper, ParallelConfig(strategy="threads", max_workers=2, min_batch_size=1))
    try:
        with pytest.warns(FallbackWarning, match="ran CE's own sequential path"):
            actual = wrapper.explain_factual(x_int)
        _assert_same(reference, actual)
        fallbacks = executor_of(wrapper).telemetry.summary()["fallbacks"]
        assert len(fallbacks) == 1
        assert "int64" in fallbacks[0]["reason"]
    finally:
        disable(wrapper)


def test_features_to_ignore_on_the_engine(data: dict[str, Any]) -> None:
    x = data["x_test"][:8]
    expected = _explainer(data).explain_factual(x, features_to_ignore=[0, 3])
    wrapper = _explainer(data)
    enable(wrapper, ParallelConfig(strategy="threads", max_workers=2, min_batch_size=1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            _assert_same(
                expected, wrapper.explain_factual(x, features_to_ignore=[0, 3])
            )
    finally:
        disable(wrapper)


def test_gating_counts_instances_not_chunks(data: dict[str, Any]) -> None:
    # min_batch_size=8 (the default): 20 instances are enough for the
    # workers even though they travel as fewer than 8 chunks; 5 instances
    # stay in the caller (no run on the executor).
    wrapper = _explainer(data)
    enable(wrapper, ParallelConfig(strategy="threads", max_workers=2))
    try:
        executor = executor_of(wrapper)
        assert executor is not None
        wrapper.explain_factual(data["x_test"][:5])
        assert executor.telemetry.runs == []
        _assert_same(
            _explainer(data).explain_factual(data["x_test"][:20]),
            wrapper.explain_factual(data["x_test"][:20]),
        )
        (run,) = executor.telemetry.runs
        assert run.strategy == "threads"
        assert run.items == run.chunks < 8
    finally:
        disable(wrapper)


def test_disable_restores_ce_default(data: dict[str, Any]) -> None:
    wrapper = _explainer(data)
    enable(wrapper, ParallelConfig(strategy="serial"))
    executor = executor_of(wrapper)
    disable(wrapper)
    assert executor is not None
    assert executor.state.value == "shut_down"
    wrapper.explain_factual(data["x_test"][:3])
    manager = wrapper.explainer.plugin_manager
    assert manager.explanation_plugin_identifiers["factual"] != PLUGIN_ID


def test_enable_needs_a_calibrated_explainer(data: dict[str, Any]) -> None:
    from calibrated_explanations import WrapCalibratedExplainer

    with pytest.raises(ConfigError, match="calibrate"):
        enable(WrapCalibratedExplainer(data["model"]))


@pytest.mark.parametrize("plugin", [False, True])
def test_repeated_calls_keep_only_the_latest_explanation(
    data: dict[str, Any], plugin: bool
) -> None:
    # CE's own path keeps one collection alive between calls: the explainer's
    # latest_explanation. The plugin used to chain each call's collection to
    # the previous one (through its deferred snapshot), keeping every
    # collection and its explainer copy, model included, alive.
    import gc
    import weakref

    wrapper = _explainer(data)
    if plugin:
        enable(wrapper, ParallelConfig(strategy="serial"))
    try:
        alive = [
            weakref.ref(wrapper.explain_factual(data["x_test"][:3])) for _ in range(4)
        ]
        gc.collect()
        assert [ref() is not None for ref in alive] == [False, False, False, True]
        assert alive[-1]() is wrapper.explainer.latest_explanation
    finally:
        if plugin:
            disable(wrapper)
