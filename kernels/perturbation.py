"""Perturbed instances of a chunk and their (feature, instance, kind, slot) index.

For every feature, calibrated-explanations' ``explain_predict_step`` copies
each instance and overwrites that one feature with each candidate value, in
a fixed order that this kernel reproduces row for row (restricted to the
chunk's instances):

- numeric feature, lesser side: for each distinct lower bound (ascending),
  for each of its lesser values (ascending), for each instance with that
  bound (ascending);
- then the greater side the same way with the upper bounds;
- then the covered side: for each instance, one row per covered value, all
  holding the *last* covered value, because CE builds these rows as views of
  one row that it overwrites in turn (CE-PLUGIN-NOTES.md section 5);
- categorical feature: for each category value (in the explainer's order),
  for each instance.

Both passes (count, then fill) run in one njit core; ``max_rows`` stops the
fill early, which lets a caller take only the first rows of a whole batch,
and ``n_covered`` builds fewer of the identical covered rows.
"""

from __future__ import annotations

import numpy as np

from ._exact import stable_argsort
from ._jit import njit
from ._validate import check_array, check_same, readonly

__all__ = ["CATEGORICAL", "IGNORED", "NUMERIC", "ROW_CATEGORICAL", "perturb"]

# feature_kind values
IGNORED = 0
NUMERIC = 1
CATEGORICAL = 2
# row_kind values 0, 1, 2 are kernels.candidates.LESSER, GREATER, COVERED.
ROW_CATEGORICAL = 3


@njit
def _count_rows(rows, feature_kind, n_values, n_covered, n_cat_values):  # type: ignore[no-untyped-def]
    total = 0
    for f in range(feature_kind.shape[0]):
        if feature_kind[f] == NUMERIC:
            for position in range(rows.shape[0]):
                i = rows[position]
                total += n_values[i, f, 0] + n_values[i, f, 1] + n_covered[i, f]
        elif feature_kind[f] == CATEGORICAL:
            total += rows.shape[0] * n_cat_values[f]
    return total


@njit
def _write_row(x, i, f, value, perturbed, r):  # type: ignore[no-untyped-def]
    for g in range(x.shape[1]):
        perturbed[r, g] = x[i, g]
    perturbed[r, f] = value


@njit
def _fill_side(  # type: ignore[no-untyped-def]
    x, rows, f, kind, bounds, values, n_values, out, r, limit
):
    """Append one side (lesser or greater) of feature f; return the new r."""
    perturbed, row_instance, row_feature, row_kind, row_slot = out
    c = rows.shape[0]
    keys = np.empty(c, dtype=np.float64)
    for position in range(c):
        keys[position] = bounds[rows[position], f]
    order = stable_argsort(keys)
    start = 0
    while start < c:
        stop = start + 1
        while stop < c and keys[order[stop]] == keys[order[start]]:
            stop += 1
        first = rows[order[start]]
        for slot in range(n_values[first, f, kind]):
            value = values[first, f, kind, slot]
            for k in range(start, stop):
                if r >= limit:
                    return r
                position = order[k]
                _write_row(x, rows[position], f, value, perturbed, r)
                row_instance[r] = position
                row_feature[r] = f
                row_kind[r] = kind
                row_slot[r] = slot
                r += 1
        start = stop
    return r


@njit
def _perturb_kernel(  # type: ignore[no-untyped-def]
    x,
    rows,
    feature_kind,
    lower,
    upper,
    values,
    n_values,
    n_covered,
    cat_values,
    n_cat_values,
    out,
):
    perturbed, row_instance, row_feature, row_kind, row_slot = out
    limit = perturbed.shape[0]
    r = 0
    for f in range(feature_kind.shape[0]):
        if feature_kind[f] == NUMERIC:
            r = _fill_side(x, rows, f, 0, lower, values, n_values, out, r, limit)
            r = _fill_side(x, rows, f, 1, upper, values, n_values, out, r, limit)
            for position in range(rows.shape[0]):
                i = rows[position]
                last = values[i, f, 2, n_values[i, f, 2] - 1]
                for slot in range(n_covered[i, f]):
                    if r >= limit:
                        return
                    _write_row(x, i, f, last, perturbed, r)
                    row_instance[r] = position
                    row_feature[r] = f
                    row_kind[r] = 2
                    row_slot[r] = slot
                    r += 1
        elif feature_kind[f] == CATEGORICAL:
            for slot in range(n_cat_values[f]):
                value = cat_values[f, slot]
                for position in range(rows.shape[0]):
                    if r >= limit:
                        return
                    _write_row(x, rows[position], f, value, perturbed, r)
                    row_instance[r] = position
                    row_feature[r] = f
                    row_kind[r] = ROW_CATEGORICAL
                    row_slot[r] = slot
                    r += 1


def perturb(
    x: np.ndarray,
    rows: np.ndarray,
    feature_kind: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    values: np.ndarray,
    n_values: np.ndarray,
    cat_values: np.ndarray,
    n_cat_values: np.ndarray,
    max_rows: int = -1,
    n_covered: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Build the perturbed instances of ``rows`` in CE's order, with index.

    Parameters
    ----------
    x : ndarray of float64, shape (n, n_features)
        All instances of the batch.
    rows : ndarray of int64, shape (c,)
        Strictly increasing indices into ``x`` of the chunk's instances.
    feature_kind : ndarray of int64, shape (n_features,)
        ``IGNORED`` (0), ``NUMERIC`` (1) or ``CATEGORICAL`` (2) per feature.
    lower, upper : ndarray of float64, shape (n, n_features)
        Rule bounds; instances with equal bounds share their values.
    values, n_values : ndarray, shapes (n, n_features, 3, n_q) and (n, n_features, 3)
        Candidate values from :func:`kernels.candidate_values`.
    cat_values : ndarray of float64, shape (n_features, width)
        Per categorical feature, its values in order (padded).
    n_cat_values : ndarray of int64, shape (n_features,)
        Number of valid entries in each row of ``cat_values``.
    max_rows : int, default -1
        Build at most this many rows (-1: all).
    n_covered : ndarray of int64, shape (n, n_features), optional
        Covered rows to build per instance x feature, at most
        ``n_values[..., 2]`` (the default, CE's count). All covered rows of
        an instance x feature are identical, so a caller that only needs
        their mean can build one (see :func:`kernels.aggregate_factual`).

    Returns
    -------
    perturbed : ndarray of float64, shape (r, n_features)
        The perturbed instances.
    row_instance : ndarray of int64, shape (r,)
        Position in ``rows`` of the instance each row perturbs.
    row_feature, row_kind, row_slot : ndarray of int64, shape (r,)
        Perturbed feature; kind 0 lesser, 1 greater, 2 covered, 3 categorical;
        index of the value among that kind's values.

    Raises
    ------
    TypeError
        If an argument is not an ndarray of the stated dtype.
    ValueError
        If shapes disagree, ``rows`` is not strictly increasing and in range,
        or ``feature_kind`` holds an unknown kind.
    """
    check_array("x", x, "f", 2)
    n, n_features = x.shape
    check_array("rows", rows, "i", 1)
    if rows.size and (rows[0] < 0 or rows[-1] >= n or np.any(np.diff(rows) <= 0)):
        msg = f"rows must be strictly increasing indices in [0, {n}), got {rows}"
        raise ValueError(msg)
    check_array("feature_kind", feature_kind, "i", 1)
    check_same("len(feature_kind)", feature_kind.shape[0], "x.shape[1]", n_features)
    if np.any((feature_kind < IGNORED) | (feature_kind > CATEGORICAL)):
        msg = f"feature_kind values must be 0, 1 or 2, got {feature_kind}"
        raise ValueError(msg)
    for name, bounds in (("lower", lower), ("upper", upper)):
        check_array(name, bounds, "f", 2)
        if bounds.shape != x.shape:
            msg = f"{name} must have the shape of x {x.shape}, got {bounds.shape}"
            raise ValueError(msg)
    check_array("values", values, "f", 4)
    check_array("n_values", n_values, "i", 3)
    if values.shape[:3] != (n, n_features, 3) or n_values.shape != (n, n_features, 3):
        msg = (
            f"values and n_values must have shapes ({n}, {n_features}, 3, n_q) and "
            f"({n}, {n_features}, 3), got {values.shape} and {n_values.shape}"
        )
        raise ValueError(msg)
    if n_values.size and (n_values.min() < 0 or n_values.max() > values.shape[3]):
        msg = f"n_values must lie in [0, {values.shape[3]}]"
        raise ValueError(msg)
    check_array("cat_values", cat_values, "f", 2)
    check_array("n_cat_values", n_cat_values, "i", 1)
    check_same("cat_values.shape[0]", cat_values.shape[0], "x.shape[1]", n_features)
    check_same("len(n_cat_values)", n_cat_values.shape[0], "x.shape[1]", n_features)
    if n_cat_values.size and (
        n_cat_values.min() < 0 or n_cat_values.max() > cat_values.shape[1]
    ):
        msg = f"n_cat_values must lie in [0, {cat_values.shape[1]}]"
        raise ValueError(msg)
    if n_covered is None:
        n_covered = np.ascontiguousarray(n_values[:, :, 2])
    check_array("n_covered", n_covered, "i", 2)
    if n_covered.shape != x.shape or np.any(
        (n_covered < 0) | (n_covered > n_values[:, :, 2])
    ):
        msg = (
            f"n_covered must have the shape of x {x.shape} and lie in "
            "[0, n_values[..., 2]]"
        )
        raise ValueError(msg)
    args = tuple(
        readonly(a)
        for a in (x, rows, feature_kind, lower, upper, values, n_values, n_covered)
    )
    total = int(_count_rows(args[1], args[2], args[6], args[7], readonly(n_cat_values)))
    if max_rows >= 0:
        total = min(total, int(max_rows))
    out = (
        np.empty((total, n_features), dtype=np.float64),
        np.empty(total, dtype=np.int64),
        np.empty(total, dtype=np.int64),
        np.empty(total, dtype=np.int64),
        np.empty(total, dtype=np.int64),
    )
    _perturb_kernel(*args, readonly(cat_values), readonly(n_cat_values), out)
    return out
