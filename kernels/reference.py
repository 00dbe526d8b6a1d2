"""Numpy oracles of the kernels: same names, same signatures, plain numpy.

Each function here computes what the kernel of the same name computes, the
way calibrated-explanations 1.0.2 computes it (``np.digitize``,
``np.percentile``, ``np.unique``, ``np.mean`` on small arrays), with no
attempt at speed. The kernel tests require bitwise equality with these.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "aggregate_factual",
    "bound_pairs",
    "candidate_values",
    "discretize",
    "perturb",
    "rule_boundaries",
]


def _bins(mins: np.ndarray, f: int, nb: int) -> np.ndarray:
    return np.concatenate(([-np.inf], mins[f, 1:nb], [np.inf]))


def discretize(
    x: np.ndarray, mins: np.ndarray, means: np.ndarray, n_bins: np.ndarray
) -> np.ndarray:
    """Replace each discretised value by the mean of its bin (numpy)."""
    out = np.array(x, copy=True)
    for f in range(x.shape[1]):
        nb = int(n_bins[f])
        if nb == 0:
            continue
        index = np.digitize(x[:, f], _bins(mins, f, nb), right=True) - 1
        out[:, f] = means[f, :nb][np.clip(index, 0, nb - 1)]
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
    """Compute each instance's open-ended rule bounds per feature (numpy)."""
    discretized = discretize(x, mins, means, n_bins)
    lower = np.array(x, copy=True)
    upper = np.array(x, copy=True)
    for f in range(x.shape[1]):
        nb = int(n_bins[f])
        if nb:
            index = np.digitize(discretized[:, f], _bins(mins, f, nb), right=True) - 1
            lower[:, f] = mins[f, :nb][index]
            upper[:, f] = maxs[f, :nb][index]
        lower[:, f] = np.where(cal_min[f] < lower[:, f], lower[:, f], -np.inf)
        upper[:, f] = np.where(cal_max[f] > upper[:, f], upper[:, f], np.inf)
    return lower, upper


def bound_pairs(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Number each feature's distinct (lower, upper) pairs (numpy)."""
    out = np.empty(lower.shape, dtype=np.int64)
    for f in range(lower.shape[1]):
        pairs = np.column_stack((lower[:, f], upper[:, f]))
        out[:, f] = np.unique(pairs, axis=0, return_inverse=True)[1].reshape(-1)
    return out


def candidate_values(
    sorted_cal: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    q: np.ndarray,
    numeric: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample lesser, greater and covered values per instance x feature."""
    n, n_features = lower.shape
    values = np.zeros((n, n_features, 3, q.shape[0]))
    n_values = np.zeros((n, n_features, 3), dtype=np.int64)
    cal_counts = np.zeros((n, n_features, 3), dtype=np.int64)
    for f in np.flatnonzero(numeric):
        column = sorted_cal[f]
        for i in range(n):
            lo, hi = lower[i, f], upper[i, f]
            sets = (
                column[column < lo],
                column[column > hi],
                column[(column >= lo) & (column <= hi)],
            )
            for kind, subset in enumerate(sets):
                cal_counts[i, f, kind] = subset.size
                if subset.size == 0:
                    continue
                sampled = np.quantile(subset, q)
                if kind < 2:
                    sampled = np.unique(sampled)
                values[i, f, kind, : sampled.size] = sampled
                n_values[i, f, kind] = sampled.size
    return values, n_values, cal_counts


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
    """Build the perturbed instances of ``rows`` in CE's order (numpy).

    Mirrors the loops of CE's ``explain_predict_step``, including covered
    rows built as views of one row of a per-feature copy.
    """
    covered_rows = n_values[:, :, 2] if n_covered is None else n_covered
    blocks: list[np.ndarray] = []
    index: list[np.ndarray] = []
    local = np.arange(rows.size)

    def add(
        block: np.ndarray, positions: np.ndarray, f: int, kind: int, slot: int
    ) -> None:
        blocks.append(block)
        index.append(
            np.column_stack(
                (
                    positions,
                    np.full((positions.size, 3), (f, kind, slot), dtype=np.int64),
                )
            )
        )

    for f in range(x.shape[1]):
        x_copy = np.array(x[rows], copy=True)
        if feature_kind[f] == 2:
            for slot in range(int(n_cat_values[f])):
                block = x_copy.copy()
                block[:, f] = cat_values[f, slot]
                add(block, local, f, 3, slot)
            continue
        if feature_kind[f] != 1:
            continue
        for kind, bounds in ((0, lower[rows, f]), (1, upper[rows, f])):
            for bound in np.unique(bounds):
                members = np.flatnonzero(bounds == bound)
                first = rows[members[0]]
                for slot in range(int(n_values[first, f, kind])):
                    block = x_copy[members, :]
                    block[:, f] = values[first, f, kind, slot]
                    add(block, members, f, kind, slot)
        for position, i in enumerate(rows):
            for slot in range(int(n_values[i, f, 2])):
                row_view = x_copy[position, :]  # a view, as in CE
                row_view[f] = values[i, f, 2, slot]
                if slot < covered_rows[i, f]:
                    add(row_view.reshape(1, -1), np.array([position]), f, 2, slot)
    if blocks:
        perturbed = np.concatenate(blocks)
        table = np.concatenate(index)
    else:
        perturbed = np.empty((0, x.shape[1]))
        table = np.empty((0, 4), dtype=np.int64)
    if max_rows >= 0:
        perturbed, table = perturbed[:max_rows], table[:max_rows]
    return (
        np.ascontiguousarray(perturbed),
        *(np.ascontiguousarray(table[:, k]) for k in range(4)),
    )  # type: ignore[return-value]


def _summarise(
    bins: np.ndarray, counts: np.ndarray, current: int, base: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CE's feature_task tail for one instance and feature."""
    mask = np.ones(bins.shape[1], dtype=bool)
    if 0 <= current < mask.size:
        mask[current] = False
    uncovered = counts[mask]
    total = uncovered.sum() if uncovered.size else 0
    fractions = (
        uncovered / total if uncovered.size and total else np.zeros(uncovered.size)
    )
    if not mask.any():
        return np.zeros(3), np.zeros(3), fractions
    predicted = np.array([float(np.mean(bins[t][mask])) for t in range(3)])
    bounds = base - predicted[1:]
    weights = np.array([base - predicted[0], np.min(bounds), np.max(bounds)])
    return predicted, weights, fractions


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
    """Aggregate a chunk's perturbed predictions (numpy, CE's feature_task)."""
    c, n_features = base_predict.shape[0], feature_kind.shape[0]
    width = max(3, int(n_cat_values.max()) if n_features else 0)
    preds = np.stack((predict, low, high))
    out = {
        "weights": np.zeros((3, c, n_features)),
        "feature_predict": np.zeros((3, c, n_features)),
        "binned": np.zeros((3, c, n_features, width)),
        "n_binned": np.zeros((c, n_features), dtype=np.int64),
        "current_bin": np.full((c, n_features), -1, dtype=np.int64),
        "counts": np.zeros((c, n_features, width)),
        "fractions": np.zeros((c, n_features, width)),
    }
    for i in range(c):
        for f in range(n_features):
            rows_if = (row_instance == i) & (row_feature == f)
            if feature_kind[f] == 1:
                bins, counts = [], []
                for side in range(2):
                    if n_values[i, f, side]:
                        mask = rows_if & (row_kind == side)
                        bins.append([np.mean(preds[t][mask]) for t in range(3)])
                        counts.append(cal_counts[i, f, side])
                mask = rows_if & (row_kind == 2)
                if current_is_self[i, f] and mask.any():
                    # Fewer covered rows than values: the last stands for the rest.
                    missing = int(n_values[i, f, 2]) - int(mask.sum())
                    bins.append(
                        [
                            np.mean(
                                np.append(
                                    preds[t][mask], [preds[t][mask][-1]] * missing
                                )
                            )
                            for t in range(3)
                        ]
                    )
                else:
                    bins.append([0.0, 0.0, 0.0])
                counts.append(cal_counts[i, f, 2])
                current = len(bins) - 1
            elif feature_kind[f] == 2:
                nv = int(n_cat_values[f])
                sums, hits = np.zeros((3, nv)), np.zeros(nv)
                slots = row_slot[rows_if]
                for t in range(3):
                    np.add.at(sums[t], slots, preds[t][rows_if])
                np.add.at(hits, slots, 1)
                averages = np.divide(
                    sums, hits, out=np.zeros_like(sums), where=hits > 0
                )
                bins, counts = list(averages.T), list(cat_counts[f, :nv])
                current = int(cat_current[i, f])
            else:
                continue
            table = np.array(bins, dtype=float).T.reshape(3, -1)
            counts_array = np.array(counts, dtype=float)
            predicted, weights, fractions = _summarise(
                table, counts_array, current, base_predict[i]
            )
            size = table.shape[1]
            out["binned"][:, i, f, :size] = table
            out["counts"][i, f, :size] = counts_array
            out["fractions"][i, f, : fractions.size] = fractions
            out["n_binned"][i, f] = size
            out["current_bin"][i, f] = current
            out["feature_predict"][:, i, f] = predicted
            out["weights"][:, i, f] = weights
    return out
