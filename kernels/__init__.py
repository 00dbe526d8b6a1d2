"""Numba kernels for perturbation-based explanations (DESIGN.md section 2).

Every kernel has three faces: a private njit core ``_<name>_kernel`` that
allocates nothing it can avoid and touches no Python objects, a public
wrapper ``<name>`` that validates its arguments and allocates the outputs,
and a numpy oracle ``kernels.reference.<name>`` with the same signature.
Kernels never read the environment, log, warn or start threads; this package
never imports ``engine``. See docs/kernels.md.
"""

from __future__ import annotations

import numpy as np

from ._jit import is_jit_enabled
from .aggregate import aggregate_factual
from .boundaries import bound_pairs, discretize, rule_boundaries
from .candidates import COVERED, GREATER, LESSER, candidate_values
from .perturbation import CATEGORICAL, IGNORED, NUMERIC, ROW_CATEGORICAL, perturb

__all__ = [
    "CATEGORICAL",
    "COVERED",
    "GREATER",
    "IGNORED",
    "LESSER",
    "NUMERIC",
    "ROW_CATEGORICAL",
    "aggregate_factual",
    "bound_pairs",
    "candidate_values",
    "discretize",
    "is_jit_enabled",
    "perturb",
    "rule_boundaries",
    "warmup",
]


def warmup() -> None:
    """Compile (or load from numba's cache) every kernel signature in use.

    Runs each public kernel once on a tiny input. The wrappers pass every
    input to the cores as a read-only view, so one call per kernel covers
    both ordinary arrays and read-only shared-memory views.

    Notes
    -----
    Idempotent and cheap after the first call in a process; a no-op beyond
    running the Python code when ``NUMBA_DISABLE_JIT=1``.
    """
    x = np.array([[0.5, 1.0], [2.5, 3.0]])
    mins = np.array([[0.0, 1.0], [0.0, 0.0]])
    maxs = np.array([[1.0, 3.0], [0.0, 0.0]])
    means = np.array([[0.5, 2.0], [0.0, 0.0]])
    n_bins = np.array([2, 0], dtype=np.int64)
    cal = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 3.0, 3.0]])
    discretize(x, mins, means, n_bins)
    lower, upper = rule_boundaries(
        x, mins, maxs, means, n_bins, cal.min(axis=1), cal.max(axis=1)
    )
    pairs = bound_pairs(lower, upper)
    q = np.array([0.25, 0.5, 0.75])
    values, n_values, cal_counts = candidate_values(
        cal, lower, upper, q, np.array([True, False])
    )
    feature_kind = np.array([NUMERIC, CATEGORICAL], dtype=np.int64)
    cat_values = np.array([[0.0, 0.0], [1.0, 3.0]])
    n_cat_values = np.array([0, 2], dtype=np.int64)
    rows = np.arange(2, dtype=np.int64)
    perturbed, row_instance, row_feature, row_kind, row_slot = perturb(
        x, rows, feature_kind, lower, upper, values, n_values, cat_values, n_cat_values
    )
    predictions = perturbed[:, 0] / 4.0
    aggregate_factual(
        predictions,
        predictions,
        predictions,
        row_instance,
        row_feature,
        row_kind,
        row_slot,
        feature_kind,
        n_values,
        cal_counts,
        pairs == rows[:, None],
        np.array([0.25, 0.75]),
        n_cat_values,
        np.array([[-1, 0], [-1, 1]], dtype=np.int64),
        np.array([[0.0, 0.0], [2.0, 2.0]]),
    )
