"""Every kernel against its numpy oracle in kernels.reference, bitwise."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _kernel_cases import Case, make_case, predictions_of, run_pipeline

import kernels
from kernels import reference

SEEDS = range(12)
EDGE_SHAPES = [
    {"n": 1, "n_features": 1, "m": 1},
    {"n": 1, "n_features": 4, "m": 9},
    {"n": 6, "n_features": 1, "m": 5},
    {"n": 9, "n_features": 3, "m": 2},
    {"n": 25, "n_features": 6, "m": 40},
]
STYLES = ["mixed", "ties", "constant", "extreme", "normal"]


def assert_same(got: Any, expected: Any, where: str = "") -> None:
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
        return
    if isinstance(got, (tuple, list)):
        assert len(got) == len(expected), where
        for k, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same(a, b, f"{where}[{k}]")
        return
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"{where}: {got.shape} != {expected.shape}"
    assert got.dtype == expected.dtype, f"{where}: {got.dtype} != {expected.dtype}"
    assert np.array_equal(got, expected), f"{where}: values differ"


def cases() -> list[Case]:
    out = [make_case(seed, style=STYLES[seed % len(STYLES)]) for seed in SEEDS]
    out += [make_case(100 + k, **shape) for k, shape in enumerate(EDGE_SHAPES)]
    out.append(make_case(200, q=np.true_divide([0, 10, 33, 50, 90, 100], 100)))
    out.append(make_case(201, q=np.array([0.75, 0.25, 0.5])))  # unsorted q
    out.append(make_case(202, kinds=[2, 2, 2, 2, 2]))
    out.append(make_case(203, kinds=[1, 0, 0, 0, 0]))
    return out


CASES = cases()
IDS = [f"case{k}" for k in range(len(CASES))]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_discretize(case: Case) -> None:
    assert_same(
        kernels.discretize(case.x, case.mins, case.means, case.n_bins),
        reference.discretize(case.x, case.mins, case.means, case.n_bins),
    )


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_rule_boundaries_and_bound_pairs(case: Case) -> None:
    args = (
        case.x,
        case.mins,
        case.maxs,
        case.means,
        case.n_bins,
        case.cal_min,
        case.cal_max,
    )
    lower, upper = kernels.rule_boundaries(*args)
    assert_same((lower, upper), reference.rule_boundaries(*args))
    assert_same(kernels.bound_pairs(lower, upper), reference.bound_pairs(lower, upper))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_candidate_values(case: Case) -> None:
    lower, upper = reference.rule_boundaries(
        case.x,
        case.mins,
        case.maxs,
        case.means,
        case.n_bins,
        case.cal_min,
        case.cal_max,
    )
    numeric = case.feature_kind == 1
    assert_same(
        kernels.candidate_values(case.sorted_cal, lower, upper, case.q, numeric),
        reference.candidate_values(case.sorted_cal, lower, upper, case.q, numeric),
    )


def chunkings(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(n)
    subsets = [np.arange(n), np.arange(0, n, 2), np.array([n - 1])]
    subsets.append(np.sort(rng.choice(n, size=max(1, n // 3), replace=False)))
    return [s.astype(np.int64) for s in subsets]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_perturb_and_aggregate_on_chunks(case: Case) -> None:
    for rows in chunkings(case.x.shape[0]):
        got = run_pipeline(kernels, case, rows, predictions_of)
        expected = run_pipeline(reference, case, rows, predictions_of)
        for key, value in expected.items():
            assert_same(got[key], value, f"{key} rows={rows.tolist()}")


AGGREGATES = (
    "weights",
    "feature_predict",
    "binned",
    "n_binned",
    "current_bin",
    "counts",
    "fractions",
)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_covered_row_aggregates_like_all_covered_rows(case: Case) -> None:
    for rows in chunkings(case.x.shape[0]):
        full = run_pipeline(kernels, case, rows, predictions_of)
        lean = run_pipeline(kernels, case, rows, predictions_of, one_covered_row=True)
        expected = run_pipeline(
            reference, case, rows, predictions_of, one_covered_row=True
        )
        assert lean["perturbed"].shape[0] <= full["perturbed"].shape[0]
        for key in AGGREGATES:
            assert_same(lean[key], full[key], f"{key} rows={rows.tolist()}")
            assert_same(lean[key], expected[key], f"{key} rows={rows.tolist()}")
        assert_same(lean["perturbed"], expected["perturbed"])


@pytest.mark.parametrize("case", CASES[:6], ids=IDS[:6])
def test_perturb_max_rows_takes_a_prefix(case: Case) -> None:
    lower, upper = kernels.rule_boundaries(
        case.x,
        case.mins,
        case.maxs,
        case.means,
        case.n_bins,
        case.cal_min,
        case.cal_max,
    )
    values, n_values, _ = kernels.candidate_values(
        case.sorted_cal, lower, upper, case.q, case.feature_kind == 1
    )
    rows = np.arange(case.x.shape[0], dtype=np.int64)
    args = (case.x, rows, case.feature_kind, lower, upper, values, n_values)
    cat = (case.cat_values, case.n_cat_values)
    full = kernels.perturb(*args, *cat)
    for limit in (0, 1, 5, full[0].shape[0], full[0].shape[0] + 3):
        prefix = kernels.perturb(*args, *cat, max_rows=limit)
        assert_same(prefix, tuple(a[:limit] for a in full))
        assert_same(prefix, reference.perturb(*args, *cat, max_rows=limit))


def test_perturb_of_no_rows_and_no_features_is_empty() -> None:
    case = make_case(7)
    lower, upper = kernels.rule_boundaries(
        case.x,
        case.mins,
        case.maxs,
        case.means,
        case.n_bins,
        case.cal_min,
        case.cal_max,
    )
    values, n_values, _ = kernels.candidate_values(
        case.sorted_cal, lower, upper, case.q, case.feature_kind == 1
    )
    none = np.zeros(case.x.shape[1], dtype=np.int64)
    for rows, kinds in (
        (np.empty(0, dtype=np.int64), case.feature_kind),
        (np.arange(3), none),
    ):
        out = kernels.perturb(
            case.x,
            rows.astype(np.int64),
            kinds,
            lower,
            upper,
            values,
            n_values,
            case.cat_values,
            case.n_cat_values,
        )
        assert out[0].shape == (0, case.x.shape[1])
        assert all(a.shape == (0,) for a in out[1:])


def test_covered_rows_carry_the_last_covered_value() -> None:
    # One instance, one numeric feature with distinct covered percentiles.
    x = np.array([[2.0]])
    sorted_cal = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]])
    lower, upper = np.array([[-np.inf]]), np.array([[np.inf]])
    q = np.array([0.25, 0.5, 0.75])
    values, n_values, _ = kernels.candidate_values(
        sorted_cal, lower, upper, q, np.array([True])
    )
    assert values[0, 0, 2].tolist() == [1.0, 2.0, 3.0]
    perturbed, *_ = kernels.perturb(
        x,
        np.array([0]),
        np.array([1]),
        lower,
        upper,
        values,
        n_values,
        np.zeros((1, 1)),
        np.zeros(1, dtype=np.int64),
    )
    assert perturbed[:, 0].tolist() == [3.0, 3.0, 3.0]


def test_aggregate_uses_numpys_summation_order() -> None:
    # Three lesser predictions whose left-to-right sum differs from numpy's.
    preds = np.array([1e16, 1.0, 1.0, 0.5])
    index = [
        np.array(v, dtype=np.int64)
        for v in ([0, 0, 0, 0], [0] * 4, [0, 0, 0, 2], [0, 1, 2, 0])
    ]
    args = (
        np.array([1]),
        np.array([[[3, 0, 1]]]),
        np.array([[[5, 0, 2]]]),
        np.array([[True]]),
        np.array([0.25]),
        np.zeros(1, dtype=np.int64),
        np.full((1, 1), -1),
        np.zeros((1, 3)),
    )
    got = kernels.aggregate_factual(preds, preds, preds, *index, *args)
    expected = reference.aggregate_factual(preds, preds, preds, *index, *args)
    assert_same(got, expected)
    assert got["binned"][0, 0, 0, 0] == np.mean(preds[:3])
