"""The public wrappers reject bad input with a clear TypeError / ValueError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _kernel_cases import make_case

import kernels

CASE = make_case(3)
LOWER, UPPER = kernels.rule_boundaries(
    CASE.x, CASE.mins, CASE.maxs, CASE.means, CASE.n_bins, CASE.cal_min, CASE.cal_max
)
VALUES, N_VALUES, CAL_COUNTS = kernels.candidate_values(
    CASE.sorted_cal, LOWER, UPPER, CASE.q, CASE.feature_kind == 1
)
ROWS = np.arange(CASE.x.shape[0], dtype=np.int64)


def boundaries(**change: Any) -> Any:
    args = {
        "x": CASE.x,
        "mins": CASE.mins,
        "maxs": CASE.maxs,
        "means": CASE.means,
        "n_bins": CASE.n_bins,
        "cal_min": CASE.cal_min,
        "cal_max": CASE.cal_max,
    }
    args.update(change)
    return kernels.rule_boundaries(**args)


def discretize(**change: Any) -> Any:
    args = {"x": CASE.x, "mins": CASE.mins, "means": CASE.means, "n_bins": CASE.n_bins}
    args.update(change)
    return kernels.discretize(**args)


def candidates(**change: Any) -> Any:
    args = {
        "sorted_cal": CASE.sorted_cal,
        "lower": LOWER,
        "upper": UPPER,
        "q": CASE.q,
        "numeric": CASE.feature_kind == 1,
    }
    args.update(change)
    return kernels.candidate_values(**args)


def perturb(**change: Any) -> Any:
    args = {
        "x": CASE.x,
        "rows": ROWS,
        "feature_kind": CASE.feature_kind,
        "lower": LOWER,
        "upper": UPPER,
        "values": VALUES,
        "n_values": N_VALUES,
        "cat_values": CASE.cat_values,
        "n_cat_values": CASE.n_cat_values,
    }
    args.update(change)
    return kernels.perturb(**args)


def aggregate(**change: Any) -> Any:
    n_rows = 4
    args = {
        "predict": np.zeros(n_rows),
        "low": np.zeros(n_rows),
        "high": np.zeros(n_rows),
        "row_instance": np.zeros(n_rows, dtype=np.int64),
        "row_feature": np.zeros(n_rows, dtype=np.int64),
        "row_kind": np.full(n_rows, 2, dtype=np.int64),
        "row_slot": np.arange(n_rows, dtype=np.int64) % 3,
        "feature_kind": CASE.feature_kind,
        "n_values": N_VALUES,
        "cal_counts": CAL_COUNTS,
        "current_is_self": np.ones(CASE.x.shape, dtype=bool),
        "base_predict": np.zeros(CASE.x.shape[0]),
        "n_cat_values": CASE.n_cat_values,
        "cat_current": np.full(CASE.x.shape, -1, dtype=np.int64),
        "cat_counts": CASE.cat_counts,
    }
    args.update(change)
    return kernels.aggregate_factual(**args)


BAD_CALLS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "x int",
        lambda: discretize(x=np.zeros(CASE.x.shape, dtype=np.int64)),
        TypeError,
        "x must have dtype float64",
    ),
    ("x list", lambda: discretize(x=CASE.x.tolist()), TypeError, "numpy.ndarray"),
    ("x 1-d", lambda: discretize(x=CASE.x[0]), ValueError, "2-dimensional"),
    (
        "x strided",
        lambda: discretize(x=np.asfortranarray(CASE.x)),
        ValueError,
        "C-contiguous",
    ),
    (
        "n_bins float",
        lambda: discretize(n_bins=CASE.n_bins.astype(float)),
        TypeError,
        "int64",
    ),
    (
        "n_bins long",
        lambda: discretize(n_bins=np.append(CASE.n_bins, 1)),
        ValueError,
        "n_bins",
    ),
    (
        "n_bins wide",
        lambda: discretize(n_bins=np.full(CASE.x.shape[1], 9)),
        ValueError,
        "table width",
    ),
    (
        "edges descend",
        lambda: discretize(
            mins=np.tile([0.0, 3.0, 1.0, 0.0], (CASE.x.shape[1], 1)),
            n_bins=np.full(CASE.x.shape[1], 3),
        ),
        ValueError,
        "non-decreasing",
    ),
    (
        "maxs narrow",
        lambda: boundaries(maxs=CASE.maxs[:, :2].copy()),
        ValueError,
        "maxs.shape[1]",
    ),
    (
        "cal_min short",
        lambda: boundaries(cal_min=CASE.cal_min[:1].copy()),
        ValueError,
        "cal_min",
    ),
    (
        "pairs shapes",
        lambda: kernels.bound_pairs(LOWER, UPPER[:1].copy()),
        ValueError,
        "one shape",
    ),
    ("q empty", lambda: candidates(q=np.empty(0)), ValueError, "at least one"),
    ("q percent", lambda: candidates(q=np.array([25.0])), ValueError, "[0, 1]"),
    ("numeric int", lambda: candidates(numeric=CASE.feature_kind), TypeError, "bool"),
    (
        "cal rows",
        lambda: candidates(sorted_cal=CASE.sorted_cal[:1].copy()),
        ValueError,
        "sorted_cal",
    ),
    (
        "rows unsorted",
        lambda: perturb(rows=ROWS[::-1].copy()),
        ValueError,
        "strictly increasing",
    ),
    ("rows range", lambda: perturb(rows=ROWS + 1), ValueError, "strictly increasing"),
    (
        "kind 5",
        lambda: perturb(feature_kind=np.full(CASE.x.shape[1], 5)),
        ValueError,
        "0, 1 or 2",
    ),
    (
        "values shape",
        lambda: perturb(values=VALUES[:1].copy()),
        ValueError,
        "values and n_values",
    ),
    (
        "n_cat wide",
        lambda: perturb(n_cat_values=np.full(CASE.x.shape[1], 99)),
        ValueError,
        "n_cat_values",
    ),
    ("low short", lambda: aggregate(low=np.zeros(3)), ValueError, "len(low)"),
    (
        "index range",
        lambda: aggregate(row_feature=np.full(4, 99, dtype=np.int64)),
        ValueError,
        "out of range",
    ),
    (
        "self int",
        lambda: aggregate(current_is_self=np.ones(CASE.x.shape, dtype=np.int64)),
        TypeError,
        "bool",
    ),
    (
        "no covered row",
        lambda: aggregate(row_kind=np.zeros(4, dtype=np.int64)),
        ValueError,
        "no covered row",
    ),
    (
        "n_covered too many",
        lambda: perturb(n_covered=N_VALUES[:, :, 2] + 1),
        ValueError,
        "n_covered",
    ),
    (
        "counts shape",
        lambda: aggregate(cal_counts=CAL_COUNTS[:1].copy()),
        ValueError,
        "cal_counts",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [case[1:] for case in BAD_CALLS],
    ids=[case[0] for case in BAD_CALLS],
)
def test_bad_input_raises_a_named_error(
    call: Callable[[], Any], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=None) as info:
        call()
    assert fragment in str(info.value)


def test_read_only_inputs_are_accepted_and_not_copied_into_outputs() -> None:
    frozen = CASE.x.copy()
    frozen.flags.writeable = False
    out = kernels.discretize(frozen, CASE.mins, CASE.means, CASE.n_bins)
    assert out.flags.writeable
    assert np.array_equal(
        out, kernels.discretize(CASE.x, CASE.mins, CASE.means, CASE.n_bins)
    )


def test_warmup_is_idempotent() -> None:
    kernels.warmup()
    kernels.warmup()
