"""Seeded random and edge-case inputs for the kernel tests.

``make_case`` builds one consistent set of inputs for the whole pipeline
(instances, calibration data, a CE-like discretiser, categorical values) and
``run_pipeline`` pushes it through a kernel module (``kernels`` or
``kernels.reference``), so every kernel can be compared on realistic inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

QUARTILES = np.true_divide([25, 50, 75], 100)


@dataclass
class Case:
    """One set of kernel inputs."""

    x: np.ndarray
    sorted_cal: np.ndarray
    mins: np.ndarray
    maxs: np.ndarray
    means: np.ndarray
    n_bins: np.ndarray
    q: np.ndarray
    feature_kind: np.ndarray
    cat_values: np.ndarray
    n_cat_values: np.ndarray
    cat_counts: np.ndarray

    @property
    def cal_min(self) -> np.ndarray:
        return np.ascontiguousarray(self.sorted_cal[:, 0])

    @property
    def cal_max(self) -> np.ndarray:
        return np.ascontiguousarray(self.sorted_cal[:, -1])


def _column(rng: np.random.Generator, size: int, style: str) -> np.ndarray:
    if style == "ties":
        return rng.integers(0, 5, size).astype(float) / 2.0
    if style == "constant":
        return np.full(size, 1.5)
    if style == "extreme":
        return rng.choice([-1e300, -1e-300, 0.0, -0.0, 1e-300, 7.0, 1e300], size)
    return rng.standard_normal(size) * 10.0 ** rng.integers(-2, 3)


def make_case(
    seed: int,
    n: int = 7,
    n_features: int = 5,
    m: int = 13,
    *,
    style: str = "mixed",
    q: np.ndarray | None = None,
    kinds: list[int] | None = None,
) -> Case:
    """A random but CE-shaped case (discretiser bins cut at calibration values)."""
    rng = np.random.default_rng(seed)
    styles = ["ties", "constant", "extreme", "normal"] if style == "mixed" else [style]
    x = np.empty((n, n_features))
    cal = np.empty((m, n_features))
    for f in range(n_features):
        column_style = styles[f % len(styles)] if style == "mixed" else style
        both = _column(rng, n + m, column_style)
        x[:, f], cal[:, f] = both[:n], both[n:]
    sorted_cal = np.ascontiguousarray(np.sort(cal, axis=0).T)
    width = 4
    mins = np.zeros((n_features, width))
    maxs = np.zeros((n_features, width))
    means = np.zeros((n_features, width))
    n_bins = np.zeros(n_features, dtype=np.int64)
    for f in range(n_features):
        if rng.random() < 0.2:
            continue  # not discretised
        distinct = np.unique(sorted_cal[f])
        k = int(rng.integers(1, min(width, distinct.size) + 1))
        edges = np.sort(rng.choice(distinct, size=k - 1, replace=False))
        lows = np.concatenate(([distinct[0]], edges))
        highs = np.concatenate((edges, [distinct[-1]]))
        mins[f, :k], maxs[f, :k] = lows, highs
        means[f, :k] = lows / 2 + highs / 2
        n_bins[f] = k
    if kinds is None:
        kinds = [int(k) for k in rng.choice([0, 1, 1, 1, 2], n_features)]
        if all(k == 0 for k in kinds):
            kinds[0] = 1
    feature_kind = np.array(kinds, dtype=np.int64)
    cat_values = np.zeros((n_features, 6))
    cat_counts = np.zeros((n_features, 6))
    n_cat_values = np.zeros(n_features, dtype=np.int64)
    for f in np.flatnonzero(feature_kind == 2):
        values = np.unique(sorted_cal[f])[:6]
        n_cat_values[f] = values.size
        cat_values[f, : values.size] = values
        cat_counts[f, : values.size] = (sorted_cal[f][None, :] == values[:, None]).sum(
            1
        )
    return Case(
        x=x,
        sorted_cal=sorted_cal,
        mins=mins,
        maxs=maxs,
        means=means,
        n_bins=n_bins,
        q=QUARTILES if q is None else q,
        feature_kind=feature_kind,
        cat_values=cat_values,
        n_cat_values=n_cat_values,
        cat_counts=cat_counts,
    )


def cat_current(case: Case) -> np.ndarray:
    """Index of each instance's own categorical value, -1 if absent."""
    out = np.full(case.x.shape, -1, dtype=np.int64)
    for f in np.flatnonzero(case.feature_kind == 2):
        values = case.cat_values[f, : case.n_cat_values[f]]
        matches = case.x[:, f][:, None] == values[None, :]
        out[:, f] = np.where(matches.any(axis=1), np.argmax(matches, axis=1), -1)
    return out


def run_pipeline(
    module: ModuleType,
    case: Case,
    rows: np.ndarray,
    predictions: Any,
    *,
    one_covered_row: bool = False,
) -> dict[str, Any]:
    """All kernels of ``module`` on ``case``; predictions(perturbed) -> 3 arrays.

    With ``one_covered_row``, perturb builds one covered row where the
    current bin reads them and none elsewhere (what the CE integration does).
    """
    lower, upper = module.rule_boundaries(
        case.x,
        case.mins,
        case.maxs,
        case.means,
        case.n_bins,
        case.cal_min,
        case.cal_max,
    )
    pairs = module.bound_pairs(lower, upper)
    values, n_values, cal_counts = module.candidate_values(
        case.sorted_cal, lower, upper, case.q, case.feature_kind == 1
    )
    is_self = pairs == np.arange(case.x.shape[0])[:, None]
    n_covered = None
    if one_covered_row:
        n_covered = np.where(is_self, np.minimum(n_values[:, :, 2], 1), 0)
    perturbed, *index = module.perturb(
        case.x,
        rows,
        case.feature_kind,
        lower,
        upper,
        values,
        n_values,
        case.cat_values,
        case.n_cat_values,
        n_covered=n_covered,
    )
    predict, low, high = predictions(perturbed)
    aggregated = module.aggregate_factual(
        predict,
        low,
        high,
        *index,
        case.feature_kind,
        np.ascontiguousarray(n_values[rows]),
        np.ascontiguousarray(cal_counts[rows]),
        np.ascontiguousarray(is_self[rows]),
        np.linspace(0.1, 0.9, rows.shape[0]),
        case.n_cat_values,
        np.ascontiguousarray(cat_current(case)[rows]),
        case.cat_counts,
    )
    return {
        "lower": lower,
        "upper": upper,
        "pairs": pairs,
        "values": values,
        "n_values": n_values,
        "cal_counts": cal_counts,
        "perturbed": perturbed,
        "index": index,
        **aggregated,
    }


def predictions_of(perturbed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fake calibrated predictions: row by row (like a forest), some ties."""
    total = perturbed.sum(axis=1)
    score = np.tanh(np.sin(total * 1e-3)) / 2 + 0.5
    coarse = np.abs(np.sin(total)) < 0.3
    score[coarse] = np.round(score[coarse] * 4) / 4
    low = np.ascontiguousarray(score * 0.9)
    high = np.ascontiguousarray(np.minimum(score * 1.1, 1.0))
    return np.ascontiguousarray(score), low, high
