"""A plain serial driver: CE's explain_factual preamble, then the kernel path.

For tests and benchmarks. It repeats what calibrated-explanations'
``CalibratedExplainer.explain_factual`` and its orchestrator do before a
factual plugin runs (validate the request, set the factual discretiser,
normalise bins and ignored features), then runs :func:`prepare`, one
:func:`explain_chunk` over every instance (or over given chunks) and
:func:`assemble`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ._assemble import assemble
from ._factual import explain_chunk, prepare

__all__ = ["explain_factual_serial", "unwrap_explainer"]


def unwrap_explainer(explainer: Any) -> Any:
    """Return the CalibratedExplainer inside a WrapCalibratedExplainer."""
    inner = getattr(explainer, "explainer", None)
    if inner is not None and hasattr(inner, "prediction_orchestrator"):
        return inner
    return explainer


def explain_factual_serial(
    explainer: Any,
    x: Any,
    threshold: Any = None,
    low_high_percentiles: tuple[float, float] = (5, 95),
    bins: Any = None,
    features_to_ignore: Any = None,
    *,
    interval_summary: Any = None,
    chunks: Iterable[Any] | None = None,
) -> Any:
    """Explain ``x`` like ``explainer.explain_factual(x)``, with the kernels.

    Parameters
    ----------
    explainer : CalibratedExplainer or WrapCalibratedExplainer
        A calibrated explainer.
    x : array-like of shape (n, n_features)
        The instances, float64 and NaN-free.
    threshold, low_high_percentiles, bins, features_to_ignore
        As for CE's ``explain_factual`` (integer feature indices only).
    interval_summary : optional
        CE's experimental interval summary; defaults to the explainer's.
    chunks : iterable of row-index arrays, optional
        Explain these chunks one after the other (default: one chunk).

    Returns
    -------
    CalibratedExplanations
        The same explanations CE's ``core.explanation.factual.sequential``
        plugin produces.

    Raises
    ------
    UnsupportedCaseError
        If the request is not covered by the kernels.
    """
    from calibrated_explanations.core.prediction_helpers import resolve_conditional_bins
    from calibrated_explanations.core.validation import (
        validate_features_to_ignore,
        validate_low_high_percentiles,
    )
    from calibrated_explanations.utils import assert_threshold
    from calibrated_explanations.utils.int_utils import as_int_array

    ce = unwrap_explainer(explainer)
    regression = "regression" in ce.mode
    if features_to_ignore is not None:
        features_to_ignore = validate_features_to_ignore(
            features_to_ignore, n_features=int(ce.num_features)
        )
    if threshold is not None and regression:
        assert_threshold(threshold, x)
    elif regression:
        low_high_percentiles = validate_low_high_percentiles(low_high_percentiles)
    bins = resolve_conditional_bins(x, bins, calibration_bins=ce.bins)
    ce.set_discretizer(
        "binaryRegressor" if regression else "binaryEntropy",
        features_to_ignore=features_to_ignore,
    )
    plan = prepare(
        ce,
        x,
        threshold=threshold,
        low_high_percentiles=tuple(low_high_percentiles)
        if low_high_percentiles is not None
        else None,
        bins=tuple(bins) if bins is not None else None,
        features_to_ignore=tuple(as_int_array(features_to_ignore or []).tolist()),
        interval_summary=interval_summary
        if interval_summary is not None
        else ce.interval_summary,
    )
    n = plan.batch.x.shape[0]
    row_chunks = [np.arange(n)] if chunks is None else list(chunks)
    results = [explain_chunk(rows, plan.model, plan.batch) for rows in row_chunks]
    return assemble(plan, results)
