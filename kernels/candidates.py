"""Candidate perturbation values of every numeric instance x feature.

For one instance and one numeric feature with rule bounds (lower, upper),
calibrated-explanations perturbs the feature to sampled percentiles of the
calibration values below ``lower`` (lesser), above ``upper`` (greater) and
inside ``[lower, upper]`` (covered), each computed by ``np.percentile`` on a
masked copy of the calibration column, 10,000 times on a 100-feature batch.
Here every calibration column is sorted once, each set is a slice of it found
by binary search, and the percentiles use numpy's exact 'linear' formula, so
the values are bit-identical at a fraction of the cost.

Lesser and greater values are deduplicated and sorted (CE applies
``np.unique``); covered values keep percentile order and duplicates.
"""

from __future__ import annotations

import numpy as np

from ._exact import percentile_sorted, searchsorted_left, searchsorted_right
from ._jit import njit
from ._validate import check_array, check_same, readonly

__all__ = ["COVERED", "GREATER", "LESSER", "candidate_values"]

LESSER = 0
GREATER = 1
COVERED = 2


@njit
def _store_percentiles(  # type: ignore[no-untyped-def]
    column, start, stop, q, unique, out, i, f, kind, scratch
):
    """Write the percentiles of column[start:stop] to out[i, f, kind]."""
    n_q = q.shape[0]
    if stop <= start:
        return 0
    for p in range(n_q):
        scratch[p] = percentile_sorted(column, start, stop, q[p])
    if not unique:
        for p in range(n_q):
            out[i, f, kind, p] = scratch[p]
        return n_q
    # np.unique: sort (insertion sort, n_q is tiny), keep the first of each run.
    for p in range(1, n_q):
        value = scratch[p]
        k = p - 1
        while k >= 0 and scratch[k] > value:
            scratch[k + 1] = scratch[k]
            k -= 1
        scratch[k + 1] = value
    count = 0
    for p in range(n_q):
        if count == 0 or scratch[p] != out[i, f, kind, count - 1]:
            out[i, f, kind, count] = scratch[p]
            count += 1
    return count


@njit
def _candidate_values_kernel(  # type: ignore[no-untyped-def]
    sorted_cal, lower, upper, q, numeric, values, n_values, cal_counts
):
    n, n_features = lower.shape
    m = sorted_cal.shape[1]
    scratch = np.empty(q.shape[0], dtype=np.float64)
    for f in range(n_features):
        if not numeric[f]:
            continue
        column = sorted_cal[f]
        for i in range(n):
            lo = lower[i, f]
            hi = upper[i, f]
            below = searchsorted_left(column, 0, m, lo)
            above = searchsorted_right(column, 0, m, hi)
            cal_counts[i, f, LESSER] = below
            cal_counts[i, f, GREATER] = m - above
            cal_counts[i, f, COVERED] = max(above - below, 0)
            n_values[i, f, LESSER] = _store_percentiles(
                column, 0, below, q, True, values, i, f, LESSER, scratch
            )
            n_values[i, f, GREATER] = _store_percentiles(
                column, above, m, q, True, values, i, f, GREATER, scratch
            )
            n_values[i, f, COVERED] = _store_percentiles(
                column, below, above, q, False, values, i, f, COVERED, scratch
            )


def candidate_values(
    sorted_cal: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    q: np.ndarray,
    numeric: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample lesser, greater and covered values for each instance x feature.

    Parameters
    ----------
    sorted_cal : ndarray of float64, shape (n_features, m)
        Row f is calibration column f sorted ascending, NaN-free.
    lower, upper : ndarray of float64, shape (n, n_features)
        Rule bounds (see :func:`kernels.rule_boundaries`).
    q : ndarray of float64, shape (n_q,)
        Percentiles as fractions, ``np.true_divide(percentiles, 100)``.
    numeric : ndarray of bool, shape (n_features,)
        Features to process; the others get no values.

    Returns
    -------
    values : ndarray of float64, shape (n, n_features, 3, n_q)
        Along axis 2: lesser, greater, covered values (padded with zeros).
    n_values : ndarray of int64, shape (n, n_features, 3)
        How many entries of ``values`` are valid.
    cal_counts : ndarray of int64, shape (n, n_features, 3)
        Calibration values below ``lower``, above ``upper`` and inside.

    Raises
    ------
    TypeError
        If an argument is not an ndarray of the stated dtype.
    ValueError
        If shapes disagree, an array is not C-contiguous or ``q`` is empty.
    """
    check_array("sorted_cal", sorted_cal, "f", 2)
    check_array("lower", lower, "f", 2)
    check_array("upper", upper, "f", 2)
    check_array("q", q, "f", 1)
    check_array("numeric", numeric, "b", 1)
    if lower.shape != upper.shape:
        msg = (
            f"lower and upper must have one shape, got {lower.shape} and {upper.shape}"
        )
        raise ValueError(msg)
    n, n_features = lower.shape
    check_same("sorted_cal.shape[0]", sorted_cal.shape[0], "n_features", n_features)
    check_same("len(numeric)", numeric.shape[0], "n_features", n_features)
    if q.shape[0] == 0 or np.any((q < 0) | (q > 1)):
        msg = f"q must hold at least one fraction in [0, 1], got {q}"
        raise ValueError(msg)
    values = np.zeros((n, n_features, 3, q.shape[0]), dtype=np.float64)
    n_values = np.zeros((n, n_features, 3), dtype=np.int64)
    cal_counts = np.zeros((n, n_features, 3), dtype=np.int64)
    _candidate_values_kernel(
        readonly(sorted_cal),
        readonly(lower),
        readonly(upper),
        readonly(q),
        readonly(numeric),
        values,
        n_values,
        cal_counts,
    )
    return values, n_values, cal_counts
