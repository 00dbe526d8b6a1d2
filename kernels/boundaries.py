"""Discretisation and rule boundaries of every instance x feature.

Three kernels, each a private njit core, a validating public wrapper and a
numpy oracle of the same name in :mod:`kernels.reference`:

- :func:`discretize` maps each value of a discretised feature to the mean of
  its bin, as calibrated-explanations' ``discretize`` does with
  ``np.digitize(..., right=True)``;
- :func:`rule_boundaries` gives each instance's (lower, upper) rule bounds
  (CE's ``rule_boundaries``), opened to -inf / +inf where no calibration value
  lies beyond them (the substitution in CE's ``explain_predict_step``);
- :func:`bound_pairs` numbers the distinct (lower, upper) pairs of each
  feature in lexicographic order: CE's ``np.unique(..., axis=0)`` inverse,
  which decides which instance's covered values a rule reports.

The discretiser is passed as padded tables: row f of ``mins``, ``maxs`` and
``means`` holds that feature's bins in its first ``n_bins[f]`` entries, and
``n_bins[f] == 0`` marks a feature that is not discretised. Values must be
NaN-free.
"""

from __future__ import annotations

import numpy as np

from ._exact import searchsorted_left, stable_argsort
from ._jit import njit
from ._validate import check_array, check_same, readonly

__all__ = ["bound_pairs", "discretize", "rule_boundaries"]


@njit
def _bin_position(edges, n_bins, value):  # type: ignore[no-untyped-def]
    """np.digitize(value, [-inf, *edges[1:n_bins], inf], right=True) - 1."""
    above_lowest = 1 if value > -np.inf else 0
    inner_below = searchsorted_left(edges, 1, n_bins, value) - 1
    return above_lowest + inner_below - 1


@njit
def _discretize_kernel(x, mins, means, n_bins, out):  # type: ignore[no-untyped-def]
    n, n_features = x.shape
    for f in range(n_features):
        nb = n_bins[f]
        for i in range(n):
            value = x[i, f]
            if nb == 0:
                out[i, f] = value
                continue
            k = _bin_position(mins[f], nb, value)
            k = min(max(k, 0), nb - 1)
            out[i, f] = means[f, k]


@njit
def _rule_boundaries_kernel(  # type: ignore[no-untyped-def]
    x, mins, maxs, means, n_bins, cal_min, cal_max, lower, upper
):
    n, n_features = x.shape
    for f in range(n_features):
        nb = n_bins[f]
        for i in range(n):
            value = x[i, f]
            if nb == 0:
                lo = value
                hi = value
            else:
                k = _bin_position(mins[f], nb, value)
                mean = means[f, min(max(k, 0), nb - 1)]
                # CE digitizes the discretised value again, without clipping;
                # a negative position indexes from the end as in Python.
                k = _bin_position(mins[f], nb, mean)
                if k < 0:
                    k += nb
                lo = mins[f, k]
                hi = maxs[f, k]
            lower[i, f] = lo if cal_min[f] < lo else -np.inf
            upper[i, f] = hi if cal_max[f] > hi else np.inf


@njit
def _bound_pairs_kernel(lower, upper, out):  # type: ignore[no-untyped-def]
    n, n_features = lower.shape
    lo_col = np.empty(n, dtype=np.float64)
    hi_col = np.empty(n, dtype=np.float64)
    for f in range(n_features):
        for i in range(n):
            lo_col[i] = lower[i, f]
            hi_col[i] = upper[i, f]
        by_upper = stable_argsort(hi_col)
        by_lower = stable_argsort(lo_col[by_upper])
        rank = -1
        prev_lo = 0.0
        prev_hi = 0.0
        for position in range(n):
            i = by_upper[by_lower[position]]
            if rank < 0 or lo_col[i] != prev_lo or hi_col[i] != prev_hi:
                rank += 1
                prev_lo = lo_col[i]
                prev_hi = hi_col[i]
            out[i, f] = rank


def _check_discretizer(
    x: np.ndarray, tables: dict[str, np.ndarray], n_bins: np.ndarray
) -> None:
    n_features = x.shape[1]
    width = -1
    for name, table in tables.items():
        check_array(name, table, "f", 2)
        check_same(f"{name}.shape[0]", table.shape[0], "x.shape[1]", n_features)
        if width >= 0:
            check_same(f"{name}.shape[1]", table.shape[1], "mins.shape[1]", width)
        width = table.shape[1]
    check_array("n_bins", n_bins, "i", 1)
    check_same("len(n_bins)", n_bins.shape[0], "x.shape[1]", n_features)
    if n_bins.size and (n_bins.min() < 0 or n_bins.max() > width):
        msg = f"n_bins must lie in [0, {width}] (the table width), got {n_bins}"
        raise ValueError(msg)
    mins = tables["mins"]
    for f in np.flatnonzero(n_bins > 1):
        edges = mins[f, 1 : n_bins[f]]
        if np.any(edges[1:] < edges[:-1]):
            msg = (
                f"mins[{f}][1:n_bins] must be non-decreasing bin edges, got {edges}; "
                "np.digitize semantics are only reproduced for ascending bins"
            )
            raise ValueError(msg)


def discretize(
    x: np.ndarray, mins: np.ndarray, means: np.ndarray, n_bins: np.ndarray
) -> np.ndarray:
    """Replace each discretised value by the mean of its bin.

    Parameters
    ----------
    x : ndarray of float64, shape (n, n_features)
        Instances, NaN-free.
    mins, means : ndarray of float64, shape (n_features, width)
        Per feature, the lower edge and the mean of each bin (padded).
    n_bins : ndarray of int64, shape (n_features,)
        Number of bins per feature; 0 leaves the feature unchanged.

    Returns
    -------
    ndarray of float64, shape (n, n_features)
        The discretised instances.

    Raises
    ------
    TypeError
        If an argument is not an ndarray of the stated dtype.
    ValueError
        If shapes disagree, an array is not C-contiguous, or edges descend.
    """
    check_array("x", x, "f", 2)
    _check_discretizer(x, {"mins": mins, "means": means}, n_bins)
    out = np.empty(x.shape, dtype=np.float64)
    _discretize_kernel(
        readonly(x), readonly(mins), readonly(means), readonly(n_bins), out
    )
    return out


def rule_boundaries(
    x: np.ndarray,
    mins: np.ndarray,
    maxs: np.ndarray,
    means: np.ndarray,
    n_bins: np.ndarray,
    cal_min: np.ndarray,
    cal_max: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute each instance's open-ended rule bounds per feature.

    Parameters
    ----------
    x : ndarray of float64, shape (n, n_features)
        Instances, NaN-free.
    mins, maxs, means : ndarray of float64, shape (n_features, width)
        Per feature, each bin's lower edge, upper edge and mean (padded).
    n_bins : ndarray of int64, shape (n_features,)
        Number of bins per feature; 0 makes the bounds the value itself.
    cal_min, cal_max : ndarray of float64, shape (n_features,)
        Smallest and largest calibration value of each feature.

    Returns
    -------
    lower, upper : ndarray of float64, shape (n, n_features)
        The bounds; ``lower`` is -inf unless some calibration value is below
        it, ``upper`` is +inf unless some calibration value is above it.

    Raises
    ------
    TypeError
        If an argument is not an ndarray of the stated dtype.
    ValueError
        If shapes disagree, an array is not C-contiguous, or edges descend.
    """
    check_array("x", x, "f", 2)
    _check_discretizer(x, {"mins": mins, "maxs": maxs, "means": means}, n_bins)
    for name, column in (("cal_min", cal_min), ("cal_max", cal_max)):
        check_array(name, column, "f", 1)
        check_same(f"len({name})", column.shape[0], "x.shape[1]", x.shape[1])
    lower = np.empty(x.shape, dtype=np.float64)
    upper = np.empty(x.shape, dtype=np.float64)
    _rule_boundaries_kernel(
        readonly(x),
        readonly(mins),
        readonly(maxs),
        readonly(means),
        readonly(n_bins),
        readonly(cal_min),
        readonly(cal_max),
        lower,
        upper,
    )
    return lower, upper


def bound_pairs(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Number each feature's distinct (lower, upper) pairs lexicographically.

    Parameters
    ----------
    lower, upper : ndarray of float64, shape (n, n_features)
        Rule bounds, NaN-free (infinities allowed).

    Returns
    -------
    ndarray of int64, shape (n, n_features)
        For instance i and feature f, the position of (lower[i, f],
        upper[i, f]) among the sorted distinct pairs of feature f.

    Raises
    ------
    TypeError
        If an argument is not a float64 ndarray.
    ValueError
        If the shapes differ or an array is not C-contiguous.
    """
    check_array("lower", lower, "f", 2)
    check_array("upper", upper, "f", 2)
    if lower.shape != upper.shape:
        msg = (
            f"lower and upper must have one shape, got {lower.shape} and {upper.shape}"
        )
        raise ValueError(msg)
    out = np.empty(lower.shape, dtype=np.int64)
    _bound_pairs_kernel(readonly(lower), readonly(upper), out)
    return out
