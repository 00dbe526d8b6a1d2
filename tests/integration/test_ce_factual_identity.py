"""The kernel path gives calibrated-explanations' own factual explanations.

Every case compares ``explain_factual_serial`` on one explainer with
``explain_factual`` (CE 1.0.2's default ``core.explanation.factual.sequential``
plugin) on a second, identically calibrated explainer: every explanation's
feature weights and predictions, binned values, prediction dict and rules.
All cases use random forests, whose predictions do not depend on batching, and
a scaled logistic regression, so equality is required bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

pytest.importorskip("calibrated_explanations")
pytest.importorskip("sklearn")

from _ce_compare import (
    assert_same_explanations,
    explanation_differences,
)
from calibrated_explanations import CalibratedExplainer
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.ensemble import (
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from engine.integrations.calibrated_explanations import (
    explain_factual_serial,
)

# --------------------------------------------------------------------- cases


@dataclass
class Case:
    """A calibrated model, the test rows and the explain_factual arguments."""

    learner: Any
    x_cal: np.ndarray
    y_cal: np.ndarray
    x_test: np.ndarray
    mode: str = "classification"
    explainer_kwargs: dict[str, Any] = field(default_factory=dict)
    explain_kwargs: dict[str, Any] = field(default_factory=dict)

    def explainer(self) -> CalibratedExplainer:
        return CalibratedExplainer(
            self.learner,
            self.x_cal,
            self.y_cal,
            mode=self.mode,
            **self.explainer_kwargs,
        )


def _split(
    x: np.ndarray, y: np.ndarray, n_test: int, n_cal: int, *, stratify: bool
) -> tuple[np.ndarray, ...]:
    rest_x, test_x, rest_y, _ = train_test_split(
        x, y, test_size=n_test, random_state=0, stratify=y if stratify else None
    )
    proper_x, cal_x, proper_y, cal_y = train_test_split(
        rest_x,
        rest_y,
        test_size=n_cal,
        random_state=0,
        stratify=rest_y if stratify else None,
    )
    return proper_x, proper_y, cal_x, cal_y, test_x


def _fitted(
    learner: Any, x: np.ndarray, y: np.ndarray, n_test: int, n_cal: int, mode: str
) -> Case:
    proper_x, proper_y, cal_x, cal_y, test_x = _split(
        x, y, n_test, n_cal, stratify=mode == "classification"
    )
    learner.fit(proper_x, proper_y)
    return Case(learner, cal_x, cal_y, test_x, mode=mode)


def _forest(n_estimators: int = 25) -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=n_estimators, random_state=0, n_jobs=1)


def _regressor() -> RandomForestRegressor:
    return RandomForestRegressor(n_estimators=25, random_state=0, n_jobs=1)


@pytest.fixture(scope="module")
def cancer() -> tuple[np.ndarray, np.ndarray]:
    return load_breast_cancer(return_X_y=True)


@pytest.fixture(scope="module")
def w1(cancer: tuple[np.ndarray, np.ndarray]) -> Case:
    """BENCH.md W1: RF(100), 100 test and 150 calibration rows."""
    return _fitted(_forest(100), *cancer, 100, 150, "classification")


@pytest.fixture(scope="module")
def binary(cancer: tuple[np.ndarray, np.ndarray]) -> Case:
    return _fitted(_forest(), *cancer, 20, 150, "classification")


@pytest.fixture(scope="module")
def multiclass() -> Case:
    return _fitted(_forest(), *load_wine(return_X_y=True), 20, 80, "classification")


@pytest.fixture(scope="module")
def regression() -> Case:
    return _fitted(_regressor(), *load_diabetes(return_X_y=True), 20, 150, "regression")


@pytest.fixture(scope="module")
def categorical(cancer: tuple[np.ndarray, np.ndarray]) -> Case:
    x = cancer[0].copy()
    x[:, 1] = np.floor(x[:, 1] / 5)  # texture in 8 integer-coded levels
    x[:, 4] = (x[:, 4] > 0.1).astype(float)  # smoothness as a 0/1 flag
    case = _fitted(_forest(), x, cancer[1], 20, 150, "classification")
    case.explainer_kwargs = {"categorical_features": [1, 4]}
    return case


@pytest.fixture(scope="module")
def logistic(cancer: tuple[np.ndarray, np.ndarray]) -> Case:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return _fitted(model, *cancer, 20, 150, "classification")


def _mondrian(case: Case) -> Case:
    cut = float(np.median(case.x_cal[:, 0]))
    return Case(
        case.learner,
        case.x_cal,
        case.y_cal,
        case.x_test,
        mode=case.mode,
        explainer_kwargs={"bins": (case.x_cal[:, 0] > cut).astype(int)},
        explain_kwargs={"bins": (case.x_test[:, 0] > cut).astype(int)},
    )


def _with(case: Case, rows: int | None = None, **explain_kwargs: Any) -> Case:
    x_test = case.x_test if rows is None else case.x_test[:rows]
    kwargs = {**case.explain_kwargs, **explain_kwargs}
    if "bins" in kwargs and rows is not None:
        kwargs["bins"] = kwargs["bins"][:rows]
    return Case(
        case.learner,
        case.x_cal,
        case.y_cal,
        x_test,
        case.mode,
        case.explainer_kwargs,
        kwargs,
    )


VARIANTS: dict[str, Callable[[pytest.FixtureRequest], Case]] = {
    "w1-rf100-100rows": lambda r: r.getfixturevalue("w1"),
    "binary": lambda r: r.getfixturevalue("binary"),
    "binary-ignore": lambda r: _with(
        r.getfixturevalue("binary"), features_to_ignore=[0, 3, 7]
    ),
    "binary-mondrian": lambda r: _mondrian(r.getfixturevalue("binary")),
    "binary-categorical": lambda r: r.getfixturevalue("categorical"),
    "binary-categorical-ignore": lambda r: _with(
        r.getfixturevalue("categorical"), features_to_ignore=[1, 2]
    ),
    "binary-logistic": lambda r: r.getfixturevalue("logistic"),
    "multiclass": lambda r: r.getfixturevalue("multiclass"),
    "multiclass-mondrian": lambda r: _mondrian(r.getfixturevalue("multiclass")),
    "multiclass-ignore": lambda r: _with(
        r.getfixturevalue("multiclass"), features_to_ignore=[0]
    ),
    "regression": lambda r: r.getfixturevalue("regression"),
    "regression-percentiles": lambda r: _with(
        r.getfixturevalue("regression"), low_high_percentiles=(10, 90)
    ),
    "regression-one-sided": lambda r: _with(
        r.getfixturevalue("regression"), low_high_percentiles=(5, np.inf)
    ),
    "regression-ignore": lambda r: _with(
        r.getfixturevalue("regression"), features_to_ignore=[1, 2]
    ),
    "regression-mondrian": lambda r: _mondrian(r.getfixturevalue("regression")),
    "probabilistic-scalar": lambda r: _with(
        r.getfixturevalue("regression"), threshold=150.0
    ),
    "probabilistic-interval": lambda r: _with(
        r.getfixturevalue("regression"), threshold=(100.0, 200.0)
    ),
    # CE scores per-instance thresholds row by row (seconds per instance).
    "probabilistic-per-instance": lambda r: _with(
        r.getfixturevalue("regression"),
        rows=3,
        threshold=np.array([90.0, 150.0, 210.0]),
    ),
}


@pytest.fixture(params=list(VARIANTS))
def case(request: pytest.FixtureRequest) -> Case:
    return VARIANTS[request.param](request)


def _both(case: Case, **ours_kwargs: Any) -> tuple[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CE's own UserWarnings, same on both
        theirs = case.explainer().explain_factual(
            case.x_test.copy(), **case.explain_kwargs
        )
        ours = explain_factual_serial(
            case.explainer(), case.x_test.copy(), **case.explain_kwargs, **ours_kwargs
        )
    return ours, theirs


# --------------------------------------------------------------------- tests


def test_serial_kernel_path_equals_ce_sequential(case: Case) -> None:
    ours, theirs = _both(case)
    assert type(ours) is type(theirs)
    assert len(ours.explanations) == case.x_test.shape[0]
    assert_same_explanations(ours, theirs)


CHUNKED = [
    "binary",
    "binary-ignore",
    "binary-mondrian",
    "binary-categorical-ignore",
    "binary-logistic",
    "multiclass",
    "regression-ignore",
    "probabilistic-scalar",
]


@pytest.mark.parametrize("name", CHUNKED)
def test_three_uneven_chunks_equal_one_chunk(
    name: str, request: pytest.FixtureRequest
) -> None:
    case = VARIANTS[name](request)
    n = case.x_test.shape[0]
    chunks = [np.arange(0, 1), np.arange(1, n // 2 + 3), np.arange(n // 2 + 3, n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = explain_factual_serial(
            case.explainer(), case.x_test.copy(), **case.explain_kwargs
        )
        chunked = explain_factual_serial(
            case.explainer(),
            case.x_test.copy(),
            **case.explain_kwargs,
            chunks=chunks[::-1],
        )
    assert_same_explanations(chunked, whole)


def test_comparison_detects_a_real_difference(binary: Case) -> None:
    explainer = binary.explainer()
    a = explain_factual_serial(explainer, binary.x_test[:4].copy())
    b = explain_factual_serial(explainer, binary.x_test[1:5].copy())
    assert explanation_differences(a, b)


def test_side_effects_match_ce(binary: Case) -> None:
    explainer = binary.explainer()
    x = binary.x_test[:3].copy()
    result = explain_factual_serial(explainer, x)
    assert explainer.latest_explanation is result
    assert not x.flags.writeable  # CE freezes the caller's array too


@pytest.mark.parametrize("layout", ["fortran", "row-strided"])
def test_non_contiguous_instances_equal_ce(binary: Case, layout: str) -> None:
    def instances() -> np.ndarray:
        if layout == "fortran":
            return np.asfortranarray(binary.x_test[:8])
        return binary.x_test[:16].copy()[::2]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = binary.explainer().explain_factual(instances())
        ours = explain_factual_serial(binary.explainer(), instances())
    assert_same_explanations(ours, theirs)
