"""The CE plan API: what is supported, what falls back, what a worker receives."""

from __future__ import annotations

import pickle
import warnings
from typing import Any

import numpy as np
import pytest

pytest.importorskip("calibrated_explanations")
pytest.importorskip("sklearn")

from calibrated_explanations import CalibratedExplainer
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.ensemble import (
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.model_selection import train_test_split

from engine.integrations.calibrated_explanations import (
    BatchState,
    ModelState,
    UnsupportedCaseError,
    assemble,
    explain_chunk,
    is_supported,
    prepare,
)


def _explainer(mode: str = "classification") -> tuple[CalibratedExplainer, np.ndarray]:
    if mode == "classification":
        x, y = load_breast_cancer(return_X_y=True)
        model: Any = RandomForestClassifier(n_estimators=10, random_state=0, n_jobs=1)
    else:
        x, y = load_diabetes(return_X_y=True)
        model = RandomForestRegressor(n_estimators=10, random_state=0, n_jobs=1)
    rest_x, test_x, rest_y, _ = train_test_split(x, y, test_size=12, random_state=0)
    fit_x, cal_x, fit_y, cal_y = train_test_split(
        rest_x, rest_y, test_size=100, random_state=0
    )
    model.fit(fit_x, fit_y)
    explainer = CalibratedExplainer(model, cal_x, cal_y, mode=mode)
    discretizer = "binaryEntropy" if mode == "classification" else "binaryRegressor"
    explainer.set_discretizer(discretizer)  # what explain_factual does first
    return explainer, test_x


@pytest.fixture(scope="module")
def classifier() -> tuple[CalibratedExplainer, np.ndarray]:
    return _explainer()


@pytest.fixture(scope="module")
def regressor() -> tuple[CalibratedExplainer, np.ndarray]:
    return _explainer("regression")


def _request(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "threshold": None,
        "low_high_percentiles": (5, 95),
        "bins": None,
        "features_to_ignore": (),
        "feature_filter_per_instance_ignore": None,
    }
    base.update(fields)
    return base


def test_plain_requests_are_supported(classifier: Any, regressor: Any) -> None:
    explainer, x = classifier
    assert is_supported(explainer, x, _request()) == (True, "")
    assert is_supported(explainer, x, None) == (True, "")
    explainer, x = regressor
    for threshold in (None, 150.0, (100.0, 200.0), np.full(len(x), 120.0)):
        assert is_supported(explainer, x, _request(threshold=threshold)) == (True, "")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"threshold": [(1.0, 2.0)] * 12}, "list of intervals"),
        ({"threshold": "high"}, "non-numeric"),
        ({"feature_filter_per_instance_ignore": ((1,),) * 12}, "per-instance"),
        ({"features_to_ignore": tuple(range(30))}, "every feature"),
        ({"features_to_ignore": ("mean radius",)}, "by name"),
    ],
)
def test_unsupported_requests_name_the_reason(
    classifier: Any, change: dict[str, Any], fragment: str
) -> None:
    explainer, x = classifier
    supported, reason = is_supported(explainer, x, _request(**change))
    assert not supported
    assert fragment in reason


@pytest.mark.parametrize(
    ("transform", "fragment"),
    [
        (lambda x: x.astype(np.float32), "dtype float32"),
        (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x), "NaN"),
    ],
)
def test_unsupported_data_names_the_reason(
    classifier: Any, transform: Any, fragment: str
) -> None:
    explainer, x = classifier
    supported, reason = is_supported(explainer, transform(x), _request())
    assert not supported
    assert fragment in reason
    with pytest.raises(UnsupportedCaseError, match="sequential path") as info:
        prepare(explainer, transform(x))
    assert fragment in info.value.reason


def test_missing_discretizer_is_unsupported(classifier: Any) -> None:
    explainer, x = classifier
    fresh = CalibratedExplainer(explainer.learner, explainer.x_cal, explainer.y_cal)
    fresh.discretizer = None
    supported, reason = is_supported(fresh, x, _request())
    assert not supported
    assert "discretizer" in reason


def _plan(explainer: Any, x: np.ndarray) -> Any:
    return prepare(
        explainer,
        x.copy(),
        features_to_ignore=(2,),
        interval_summary=explainer.interval_summary,
    )


def test_pickled_state_gives_the_same_chunk_results(classifier: Any) -> None:
    explainer, x = classifier
    plan = _plan(explainer, x)
    assert isinstance(plan.model, ModelState)
    assert isinstance(plan.batch, BatchState)
    model = pickle.loads(pickle.dumps(plan.model, protocol=pickle.HIGHEST_PROTOCOL))
    batch = pickle.loads(pickle.dumps(plan.batch, protocol=pickle.HIGHEST_PROTOCOL))
    local = explain_chunk(np.arange(3, 9), plan.model, plan.batch)
    remote = explain_chunk(np.arange(3, 9), model, batch)
    assert local.keys() == remote.keys()
    for key, value in local.items():
        if key in RULE_KEYS:
            assert value == remote[key], key
        else:
            assert np.array_equal(value, remote[key]), key


RULE_KEYS = ("rules", "conditions")


def test_chunk_results_are_plain_arrays(classifier: Any) -> None:
    explainer, x = classifier
    plan = _plan(explainer, x)
    result = explain_chunk(slice(0, 4), plan.model, plan.batch)
    arrays = {key: value for key, value in result.items() if key not in RULE_KEYS}
    assert all(isinstance(value, np.ndarray) for value in arrays.values())
    # CE's rules and conditions of each row, computed where the chunk ran;
    # sampled_values are linked by the caller (they are its binned arrays).
    assert len(result["rules"]) == len(result["conditions"]) == 4
    for rules, conditions in zip(result["rules"], result["conditions"], strict=True):
        assert rules["sampled_values"] is None
        assert len(rules["rule"]) == len(rules["feature"]) > 0
        assert len(conditions) == x.shape[1]
        assert all(isinstance(text, str) for text in conditions)
    assert result["rows"].tolist() == [0, 1, 2, 3]
    assert result["weights"].shape == (3, 4, x.shape[1])
    assert result["ignored_binned"].shape == (3, 4)
    assert explain_chunk(range(4), plan.model, plan.batch)["rows"].tolist() == [
        0,
        1,
        2,
        3,
    ]


def test_assemble_rejects_missing_or_repeated_rows(classifier: Any) -> None:
    explainer, x = classifier
    plan = _plan(explainer, x)
    first = explain_chunk(np.arange(0, 6), plan.model, plan.batch)
    with pytest.raises(ValueError, match="no chunk result for instances"):
        assemble(plan, [first])
    with pytest.raises(ValueError, match="repeat an instance"):
        assemble(plan, [first, first])


def test_results_in_any_order_assemble_alike(classifier: Any) -> None:
    explainer, x = classifier
    plan = _plan(explainer, x)
    parts = [
        explain_chunk(rows, plan.model, plan.batch) for rows in ([0, 1], [2, 3, 4])
    ]
    rest = explain_chunk(np.arange(5, len(x)), plan.model, plan.batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = assemble(plan, [*parts, rest])
        b = assemble(plan, [rest, parts[1], parts[0]])
    for ea, eb in zip(a.explanations, b.explanations, strict=True):
        for key in ("predict", "low", "high"):
            assert np.array_equal(ea.feature_weights[key], eb.feature_weights[key])


def test_ce_validation_errors_are_ces_own(classifier: Any, regressor: Any) -> None:
    from calibrated_explanations.utils.exceptions import ValidationError

    explainer, x = classifier
    with pytest.raises(ValidationError, match="only supported for mode='regression'"):
        prepare(explainer, x.copy(), threshold=0.5)


def test_threads_sharing_one_model_state_match_serial(regressor: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    explainer, x = regressor
    x = x[:4].copy()
    plan = prepare(
        explainer,
        x,
        threshold=np.array([90.0, 150.0, 210.0, 120.0]),
        interval_summary=explainer.interval_summary,
    )
    chunks = [np.array([0, 1]), np.array([2, 3])]
    serial = [explain_chunk(rows, plan.model, plan.batch) for rows in chunks]
    with ThreadPoolExecutor(2) as pool:
        threaded = list(
            pool.map(lambda r: explain_chunk(r, plan.model, plan.batch), chunks)
        )
    for a, b in zip(serial, threaded, strict=True):
        for key, value in a.items():
            assert np.array_equal(value, b[key]), key


def test_a_model_state_is_reused_for_its_own_explainer_only(
    classifier: Any, regressor: Any
) -> None:
    explainer, x = classifier
    first = prepare(explainer, x.copy())
    again = prepare(explainer, x.copy(), model=first.model)
    assert again.model is first.model
    other, x_other = regressor
    assert prepare(other, x_other.copy(), model=first.model).model is not first.model
