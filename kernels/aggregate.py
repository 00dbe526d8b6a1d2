"""Per-feature aggregation of perturbed predictions into factual weights.

This is the arithmetic of calibrated-explanations' ``feature_task`` for all
features of a chunk at once. For each instance and feature the perturbed
predictions are averaged per bin (lesser, greater and current for a numeric
feature, one bin per value for a categorical one), the bins other than the
instance's own are averaged into the feature prediction, and the weight is
the instance's prediction minus that (low and high take the min and max of
the two bounds' weights). Every mean is numpy's own pairwise sum divided by
the count, in CE's summation order, so the results are bit-identical.

Two quirks of CE are reproduced on purpose: a numeric feature's current bin
averages the covered rows only when the instance's bound-pair number equals
its own batch index (``current_is_self``), and is 0 otherwise; and the
numeric bins' calibration counts come from the candidate step. Since covered
rows are only read in that case, and are identical copies, a caller may
build one covered row where ``current_is_self`` holds and none elsewhere.
"""

from __future__ import annotations

import numpy as np

from ._exact import np_mean, np_sum
from ._jit import njit
from ._validate import check_array, check_same, readonly

__all__ = ["aggregate_factual"]

_NUMERIC = 1
_CATEGORICAL = 2
_COVERED = 2
_ROW_CATEGORICAL = 3


@njit
def _accumulate(  # type: ignore[no-untyped-def]
    preds, row_instance, row_feature, row_kind, row_slot, n_q, acc, hits, covered_hits
):
    for r in range(row_instance.shape[0]):
        i = row_instance[r]
        f = row_feature[r]
        kind = row_kind[r]
        if kind == _ROW_CATEGORICAL:
            slot = row_slot[r]
            for t in range(3):
                acc[t, i, f, slot] += preds[t, r]
            hits[i, f, slot] += 1
        else:
            slot = kind * n_q + row_slot[r]
            for t in range(3):
                acc[t, i, f, slot] = preds[t, r]
            if kind == _COVERED:
                covered_hits[i, f] += 1


@njit
def _finish(  # type: ignore[no-untyped-def]
    i, f, base, n_unc, bins_scratch, count_scratch, weights, feature_predict, fractions
):
    """Feature prediction, weights and fractions from the uncovered bins.

    ``bins_scratch[t, :n_unc]`` and ``count_scratch[:n_unc]`` hold the bins
    other than the current one, in CE's order, contiguous for np.mean.
    """
    if n_unc == 0:
        return
    for t in range(3):
        feature_predict[t, i, f] = np_mean(bins_scratch[t], 0, n_unc)
    weights[0, i, f] = base - feature_predict[0, i, f]
    w_low = base - feature_predict[1, i, f]
    w_high = base - feature_predict[2, i, f]
    # np.min / np.max of [w_low, w_high]: the second wins ties.
    weights[1, i, f] = w_low if w_low < w_high else w_high
    weights[2, i, f] = w_low if w_low > w_high else w_high
    total = np_sum(count_scratch, 0, n_unc)
    if total != 0:
        for k in range(n_unc):
            fractions[i, f, k] = count_scratch[k] / total


@njit
def _aggregate_kernel(  # type: ignore[no-untyped-def]
    preds,
    rows_index,
    feature_kind,
    n_values,
    cal_counts,
    current_is_self,
    base_predict,
    n_cat_values,
    cat_current,
    cat_counts,
    n_q,
    out,
):
    row_instance, row_feature, row_kind, row_slot = rows_index
    weights, feature_predict, binned, n_binned, current_bin, counts, fractions = out
    c = base_predict.shape[0]
    n_features = feature_kind.shape[0]
    width = binned.shape[3]
    acc = np.zeros((3, c, n_features, max(3 * n_q, width)), dtype=np.float64)
    hits = np.zeros((c, n_features, width), dtype=np.int64)
    covered_hits = np.zeros((c, n_features), dtype=np.int64)
    _accumulate(
        preds,
        row_instance,
        row_feature,
        row_kind,
        row_slot,
        n_q,
        acc,
        hits,
        covered_hits,
    )
    bins_scratch = np.empty((3, width), dtype=np.float64)
    count_scratch = np.empty(width, dtype=np.float64)
    for i in range(c):
        base = base_predict[i]
        for f in range(n_features):
            kind = feature_kind[f]
            if kind == _NUMERIC:
                nb = 0
                for side in range(2):
                    nv = n_values[i, f, side]
                    if nv > 0:
                        for t in range(3):
                            binned[t, i, f, nb] = np_mean(acc[t, i, f], side * n_q, nv)
                        counts[i, f, nb] = cal_counts[i, f, side]
                        nb += 1
                nv = n_values[i, f, _COVERED]
                given = covered_hits[i, f]
                if current_is_self[i, f] and nv > 0:
                    # Covered rows are identical: the last given one stands
                    # for those the caller did not build.
                    for t in range(3):
                        for s in range(given, nv):
                            acc[t, i, f, _COVERED * n_q + s] = acc[
                                t, i, f, _COVERED * n_q + given - 1
                            ]
                    for t in range(3):
                        binned[t, i, f, nb] = np_mean(acc[t, i, f], _COVERED * n_q, nv)
                counts[i, f, nb] = cal_counts[i, f, _COVERED]
                current_bin[i, f] = nb
                n_binned[i, f] = nb + 1
                # The current bin is last: the uncovered ones are the first nb.
                for k in range(nb):
                    for t in range(3):
                        bins_scratch[t, k] = binned[t, i, f, k]
                    count_scratch[k] = counts[i, f, k]
                _finish(
                    i,
                    f,
                    base,
                    nb,
                    bins_scratch,
                    count_scratch,
                    weights,
                    feature_predict,
                    fractions,
                )
            elif kind == _CATEGORICAL:
                nv = n_cat_values[f]
                current = cat_current[i, f]
                current_bin[i, f] = current
                n_binned[i, f] = nv
                n_unc = 0
                for v in range(nv):
                    counts[i, f, v] = cat_counts[f, v]
                    hit = hits[i, f, v]
                    for t in range(3):
                        binned[t, i, f, v] = acc[t, i, f, v] / hit if hit > 0 else 0.0
                    if v != current:
                        for t in range(3):
                            bins_scratch[t, n_unc] = binned[t, i, f, v]
                        count_scratch[n_unc] = counts[i, f, v]
                        n_unc += 1
                _finish(
                    i,
                    f,
                    base,
                    n_unc,
                    bins_scratch,
                    count_scratch,
                    weights,
                    feature_predict,
                    fractions,
                )


def aggregate_factual(
    predict: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    row_instance: np.ndarray,
    row_feature: np.ndarray,
    row_kind: np.ndarray,
    row_slot: np.ndarray,
    feature_kind: np.ndarray,
    n_values: np.ndarray,
    cal_counts: np.ndarray,
    current_is_self: np.ndarray,
    base_predict: np.ndarray,
    n_cat_values: np.ndarray,
    cat_current: np.ndarray,
    cat_counts: np.ndarray,
) -> dict[str, np.ndarray]:
    """Aggregate a chunk's perturbed predictions into weights and bins.

    Parameters
    ----------
    predict, low, high : ndarray of float64, shape (r,)
        Calibrated prediction and interval of each perturbed row.
    row_instance, row_feature, row_kind, row_slot : ndarray of int64, shape (r,)
        The row index from :func:`kernels.perturb` (instance = chunk position).
        Covered rows may be fewer than ``n_values[..., 2]`` (``perturb``'s
        ``n_covered``): being identical, the last one stands for the rest.
        At least one is needed wherever ``current_is_self`` holds.
    feature_kind : ndarray of int64, shape (n_features,)
        0 ignored, 1 numeric, 2 categorical.
    n_values, cal_counts : ndarray of int64, shape (c, n_features, 3)
        The chunk's rows of :func:`kernels.candidate_values`' outputs.
    current_is_self : ndarray of bool, shape (c, n_features)
        Whether the instance's bound-pair number equals its batch index.
    base_predict : ndarray of float64, shape (c,)
        Each instance's own calibrated prediction.
    n_cat_values : ndarray of int64, shape (n_features,)
        Number of values of each categorical feature.
    cat_current : ndarray of int64, shape (c, n_features)
        Index of the instance's own value among them, or -1.
    cat_counts : ndarray of float64, shape (n_features, width)
        Calibration count of each categorical value (padded).

    Returns
    -------
    dict of str to ndarray
        ``weights`` and ``feature_predict`` (3, c, n_features) for predict,
        low, high; ``binned`` (3, c, n_features, width) bin averages;
        ``n_binned``, ``current_bin`` (c, n_features) int64; ``counts`` and
        ``fractions`` (c, n_features, width), fractions over the bins other
        than the current one, in order.

    Raises
    ------
    TypeError
        If an argument is not an ndarray of the stated dtype.
    ValueError
        If shapes disagree or an index is out of range.
    """
    index = (row_instance, row_feature, row_kind, row_slot)
    for name, array in zip(
        ("predict", "low", "high"), (predict, low, high), strict=True
    ):
        check_array(name, array, "f", 1)
    n_rows = predict.shape[0]
    for name, array in zip(
        ("row_instance", "row_feature", "row_kind", "row_slot"), index, strict=True
    ):
        check_array(name, array, "i", 1)
        check_same(f"len({name})", array.shape[0], "len(predict)", n_rows)
    check_same("len(low)", low.shape[0], "len(predict)", n_rows)
    check_same("len(high)", high.shape[0], "len(predict)", n_rows)
    check_array("base_predict", base_predict, "f", 1)
    c = base_predict.shape[0]
    check_array("feature_kind", feature_kind, "i", 1)
    n_features = feature_kind.shape[0]
    check_array("n_values", n_values, "i", 3)
    check_array("cal_counts", cal_counts, "i", 3)
    for name, array in (("n_values", n_values), ("cal_counts", cal_counts)):
        if array.shape != (c, n_features, 3):
            msg = f"{name} must have shape ({c}, {n_features}, 3), got {array.shape}"
            raise ValueError(msg)
    check_array("current_is_self", current_is_self, "b", 2)
    check_array("n_cat_values", n_cat_values, "i", 1)
    check_array("cat_current", cat_current, "i", 2)
    check_array("cat_counts", cat_counts, "f", 2)
    for name, shape, expected in (
        ("current_is_self", current_is_self.shape, (c, n_features)),
        ("cat_current", cat_current.shape, (c, n_features)),
        ("n_cat_values", n_cat_values.shape, (n_features,)),
        ("cat_counts", cat_counts.shape[:1], (n_features,)),
    ):
        if shape != expected:
            msg = f"{name} must have shape {expected}, got {shape}"
            raise ValueError(msg)
    max_cat = int(n_cat_values.max()) if n_features else 0
    if max_cat > cat_counts.shape[1] or (n_cat_values.size and n_cat_values.min() < 0):
        msg = f"n_cat_values must lie in [0, {cat_counts.shape[1]}]"
        raise ValueError(msg)
    n_q = int(max(n_values.max(), 1)) if n_values.size else 1
    if n_rows:
        bad = (
            (row_instance.min() < 0)
            | (row_instance.max() >= c)
            | (row_feature.min() < 0)
            | (row_feature.max() >= n_features)
            | (row_kind.min() < 0)
            | (row_kind.max() > _ROW_CATEGORICAL)
            | (row_slot.min() < 0)
            | (row_slot.max() >= max(n_q, max_cat))
        )
        if bad:
            msg = "the row index holds an instance, feature, kind or slot out of range"
            raise ValueError(msg)
    covered = row_kind == _COVERED
    given = np.bincount(
        row_instance[covered] * n_features + row_feature[covered],
        minlength=c * n_features,
    ).reshape(c, n_features)
    needed = current_is_self & (feature_kind == _NUMERIC) & (n_values[:, :, 2] > 0)
    if np.any(needed & (given == 0)):
        msg = (
            "an instance x feature with current_is_self and covered values has no "
            "covered row; build at least one (perturb's n_covered)"
        )
        raise ValueError(msg)
    width = max(3, max_cat)
    out = (
        np.zeros((3, c, n_features), dtype=np.float64),
        np.zeros((3, c, n_features), dtype=np.float64),
        np.zeros((3, c, n_features, width), dtype=np.float64),
        np.zeros((c, n_features), dtype=np.int64),
        np.full((c, n_features), -1, dtype=np.int64),
        np.zeros((c, n_features, width), dtype=np.float64),
        np.zeros((c, n_features, width), dtype=np.float64),
    )
    preds = np.stack((predict, low, high))
    _aggregate_kernel(
        readonly(preds),
        tuple(readonly(a) for a in index),
        readonly(feature_kind),
        readonly(n_values),
        readonly(cal_counts),
        readonly(current_is_self),
        readonly(base_predict),
        readonly(n_cat_values),
        readonly(cat_current),
        readonly(cat_counts),
        n_q,
        out,
    )
    keys = ("weights", "feature_predict", "binned", "n_binned", "current_bin")
    result = dict(zip(keys, out[:5], strict=True))
    result["counts"] = out[5]
    result["fractions"] = out[6]
    return result
