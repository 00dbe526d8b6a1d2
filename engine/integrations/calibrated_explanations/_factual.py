"""Factual explanations of a batch: caller-side prepare, worker-side chunks.

The computation of calibrated-explanations' (CE) ``core.explanation.factual
.sequential`` plugin, split for parallel use::

    caller                                   workers (any strategy)
    prepare(explainer, x, **request)
      base predictions of the whole batch
      rule bounds, candidate values,         ParallelExecutor.imap(
      bound-pair numbers (kernels)  ──────▶     explain_chunk, chunks,
      -> FactualPlan(model, batch)              plan.model, plan.batch)
                                               perturb (kernel), one
    FactualAssembler(plan)                     predict call, aggregate
      .add(result) per chunk    ◀──────────── -> plain arrays per chunk
      .finish() -> CE's CalibratedExplanations
    (assemble(plan, results) does the last three steps at once)

Everything that depends on the caller's whole batch (CE-PLUGIN-NOTES.md
section 5: the bound-pair number j that picks a rule's covered values, the
``__full_probabilities__`` matrix, the perturbed rows that CE stores for
ignored features) is computed in :func:`prepare`, so any chunking gives the
unchunked result. :func:`explain_chunk` needs only its rows, the
:class:`~._ce_state.ModelState` and the :class:`BatchState`; both are
picklable and the batch's arrays are plain numpy, ready for shared memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from time import time
from typing import Any, final

import numpy as np

import kernels

from ._ce_state import (
    ModelState,
    ScoreMemo,
    UnsupportedCaseError,
    categorical_tables,
    discretizer_tables,
    is_supported,
    threshold_kind,
)
from ._rules import RuleContext, chunk_rules, gc_paused

__all__ = [
    "BatchState",
    "FactualPlan",
    "add_full_probabilities",
    "explain_chunk",
    "prepare",
]

_DEFAULT_PERCENTILES = (5, 95)


@final
@dataclass(frozen=True)
class BatchState:
    """Per-call arrays a worker needs for any chunk of the batch.

    Shapes use n instances, F features, q sampled percentiles and w the
    widest categorical feature. All arrays are C-contiguous numpy.
    """

    x: np.ndarray  # (n, F) float64, the validated instances
    feature_kind: np.ndarray  # (F,) int64: kernels.IGNORED / NUMERIC / CATEGORICAL
    lower: np.ndarray  # (n, F) float64 open-ended rule bounds
    upper: np.ndarray  # (n, F)
    values: np.ndarray  # (n, F, 3, q) lesser / greater / covered values
    n_values: np.ndarray  # (n, F, 3) int64
    cal_counts: np.ndarray  # (n, F, 3) int64
    current_is_self: np.ndarray  # (n, F) bool: bound-pair number == instance
    n_covered: np.ndarray  # (n, F) int64: covered rows to build (0 or 1)
    cat_values: np.ndarray  # (F, w) float64
    n_cat_values: np.ndarray  # (F,) int64
    cat_counts: np.ndarray  # (F, w) float64
    cat_current: np.ndarray  # (n, F) int64
    base_predict: np.ndarray  # (n,) float64, each instance's calibrated prediction
    base_low: np.ndarray  # (n,) CE's prediction["low"], as CE holds it
    base_high: np.ndarray  # (n,) CE's prediction["high"]
    classes: np.ndarray  # (n,) the class each perturbed row is scored for
    bins: np.ndarray | None  # (n,) Mondrian categories
    threshold: Any  # None, a scalar, an interval tuple, or (n,) float64
    threshold_per_instance: bool
    low_high_percentiles: tuple[float, float]
    interval_summary: Any
    ignored_rows: np.ndarray | None  # (n, F): row i of CE's perturbed matrix
    ignored_sources: np.ndarray | None  # (n,) int64: whose row that is
    features_to_ignore: np.ndarray  # the collection's ignored features (rules)


@final
@dataclass
class FactualPlan:
    """What assembly needs; ``model`` and ``batch`` also go to workers."""

    explainer: Any
    model: ModelState
    batch: BatchState
    x: np.ndarray  # the instances as CE validated them (read-only)
    prediction: dict[str, Any]
    bound_pairs: np.ndarray  # (n, F) int64, CE's j per instance and feature
    threshold: Any  # as the caller gave it
    bins: Any  # as the caller gave it (CE keeps a tuple)
    features_to_ignore: np.ndarray
    scores: ScoreMemo  # the batch's model scores, for CE's repeated calls
    start_time_s: float = field(default_factory=time)
    full_probabilities_done: bool = False


def _validate(explainer: Any, x: Any, threshold: Any, bins: Any) -> np.ndarray:
    """The checks CE makes before explain_predict_step, with CE's errors."""
    from calibrated_explanations.core.explain._helpers import validate_and_prepare_input
    from calibrated_explanations.utils import assert_threshold
    from calibrated_explanations.utils.exceptions import DataShapeError, ValidationError

    x = validate_and_prepare_input(explainer, x)
    is_mondrian = getattr(explainer, "is_mondrian", False)
    if callable(is_mondrian):
        is_mondrian = is_mondrian()
    if is_mondrian and bins is None:
        msg = "Bins required for Mondrian explanations"
        raise ValidationError(msg)
    if bins is not None and len(bins) != len(x):
        msg = "The length of bins must match the number of added instances."
        raise DataShapeError(msg)
    if threshold is not None:
        if "regression" not in explainer.mode:
            msg = "The threshold parameter is only supported for mode='regression'."
            raise ValidationError(msg)
        assert_threshold(threshold, x)
    return x


def _base_prediction(
    explainer: Any,
    x: np.ndarray,
    threshold: Any,
    low_high_percentiles: tuple[float, float],
    bins: np.ndarray | None,
    interval_summary: Any,
) -> dict[str, Any]:
    """CE's prediction dict for the batch, but ``__full_probabilities__``.

    That key comes later, from :func:`add_full_probabilities`.
    """
    predict, low, high, predicted_class = (
        explainer.prediction_orchestrator.predict_internal(
            x,
            threshold=threshold,
            low_high_percentiles=low_high_percentiles,
            bins=bins,
            classes=None,
            interval_summary=interval_summary,
        )
    )
    multiclass = explainer.is_multiclass()
    prediction: dict[str, Any] = {
        "predict": predict,
        "low": low,
        "high": high,
        "classes": predicted_class if multiclass else np.ones(predict.shape),
    }
    return prediction


def add_full_probabilities(plan: FactualPlan) -> None:
    """Add CE's ``__full_probabilities__`` to ``plan.prediction``, once.

    CE stores the batch's calibrated probability matrix in every
    classification explanation. Only the explanations read it, so the plugin
    computes it after the chunks are dispatched, while workers compute.
    """
    from calibrated_explanations.utils.exceptions import CalibratedError

    explainer, prediction = plan.explainer, plan.prediction
    if explainer.mode != "classification" or plan.full_probabilities_done:
        return
    plan.full_probabilities_done = True
    batch = plan.batch
    # CE omits the key when the calibrator cannot give it.
    with contextlib.suppress(AttributeError, CalibratedError):
        learner = explainer.interval_learner
        with plan.scores.installed(explainer):
            prediction["__full_probabilities__"] = learner.predict_proba(
                plan.x, bins=batch.bins, interval_summary=batch.interval_summary
            )


def _ignored_rows(
    x: np.ndarray, tables: dict[str, np.ndarray]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The first n rows of CE's perturbed matrix, if features are ignored.

    CE stores ``predict[i]`` of its perturbed matrix as the binned value of an
    ignored feature for instance i (CE-PLUGIN-NOTES.md section 5), so the
    chunk holding instance i must also score row i of the batch's matrix.
    """
    if not np.any(tables["feature_kind"] == kernels.IGNORED):
        return None, None
    n = x.shape[0]
    rows, sources, *_ = kernels.perturb(
        x,
        np.arange(n, dtype=np.int64),
        tables["feature_kind"],
        tables["lower"],
        tables["upper"],
        tables["values"],
        tables["n_values"],
        tables["cat_values"],
        tables["n_cat_values"],
        max_rows=n,
    )
    if rows.shape[0] < n:
        reason = "fewer perturbed rows than instances with ignored features"
        raise UnsupportedCaseError(reason)
    return rows, sources


def _tables(explainer: Any, x: np.ndarray, ignore: np.ndarray) -> dict[str, np.ndarray]:
    """Run the prepare-side kernels over the whole batch."""
    n, num_features = x.shape
    x_cal = np.asarray(explainer.x_cal, dtype=np.float64)
    sorted_cal = np.ascontiguousarray(np.sort(x_cal, axis=0).T)
    feature_kind = np.full(num_features, kernels.NUMERIC, dtype=np.int64)
    categorical = np.array(
        [int(f) for f in getattr(explainer, "categorical_features", ())], dtype=np.int64
    )
    feature_kind[categorical] = kernels.CATEGORICAL
    feature_kind[ignore] = kernels.IGNORED
    disc = discretizer_tables(explainer.discretizer, num_features)
    lower, upper = kernels.rule_boundaries(
        x,
        disc.mins,
        disc.maxs,
        disc.means,
        disc.n_bins,
        np.ascontiguousarray(sorted_cal[:, 0]),
        np.ascontiguousarray(sorted_cal[:, -1]),
    )
    q = np.ascontiguousarray(
        np.true_divide(explainer.sample_percentiles, 100), dtype=np.float64
    ).reshape(-1)
    values, n_values, cal_counts = kernels.candidate_values(
        sorted_cal, lower, upper, q, feature_kind == kernels.NUMERIC
    )
    pairs = kernels.bound_pairs(lower, upper)
    cat_values, n_cat_values, cat_counts, cat_current = categorical_tables(
        explainer, x, x_cal, np.flatnonzero(feature_kind == kernels.CATEGORICAL)
    )
    return {
        "feature_kind": feature_kind,
        "lower": lower,
        "upper": upper,
        "values": values,
        "n_values": n_values,
        "cal_counts": cal_counts,
        "bound_pairs": pairs,
        "current_is_self": pairs == np.arange(n, dtype=np.int64)[:, None],
        "cat_values": cat_values,
        "n_cat_values": n_cat_values,
        "cat_counts": cat_counts,
        "cat_current": cat_current,
    }


def prepare(
    explainer: Any,
    x: Any,
    *,
    threshold: Any = None,
    low_high_percentiles: tuple[float, float] | None = _DEFAULT_PERCENTILES,
    bins: Any = None,
    features_to_ignore: Any = None,
    interval_summary: Any = None,
    model: ModelState | None = None,
) -> FactualPlan:
    """Do the caller-side work of a factual explanation of ``x``.

    Parameters
    ----------
    explainer : CalibratedExplainer
        CE's explainer with its factual discretiser already set (CE's
        ``explain_factual`` sets it before any plugin runs).
    x : array-like of shape (n, n_features)
        The instances; float64, NaN-free. CE makes it read-only.
    threshold, low_high_percentiles, bins, features_to_ignore, interval_summary
        CE's request fields, as its plugin receives them; ``features_to_ignore``
        is merged with the explainer's own list as CE does.
    model : ModelState, optional
        A ``plan.model`` of an earlier call on the same explainer, reused so
        that an executor that shares it by identity ships it only once.

    Returns
    -------
    FactualPlan
        ``plan.model`` and ``plan.batch`` for :func:`explain_chunk`, the
        rest for :func:`assemble`.

    Raises
    ------
    UnsupportedCaseError
        If the kernels do not reproduce this request (see :func:`is_supported`).
    calibrated_explanations.utils.exceptions.ValidationError
        For the invalid requests CE itself rejects, with CE's message.
    """
    from calibrated_explanations.core.explain._helpers import merge_ignore_features

    start_time_s = time()
    request = {"threshold": threshold, "features_to_ignore": features_to_ignore}
    supported, reason = is_supported(explainer, x, request)
    if not supported:
        raise UnsupportedCaseError(reason)
    x = _validate(explainer, x, threshold, bins)
    ignore = merge_ignore_features(explainer, features_to_ignore)
    percentiles = tuple(low_high_percentiles or _DEFAULT_PERCENTILES)
    bins_array = None if bins is None else np.asarray(bins)
    scores = ScoreMemo(x)
    with scores.installed(explainer):
        prediction = _base_prediction(
            explainer, x, threshold, percentiles, bins_array, interval_summary
        )
    if np.asarray(prediction["predict"]).dtype != np.float64:
        reason = f"calibrated predictions of dtype {prediction['predict'].dtype}"
        raise UnsupportedCaseError(reason)
    x.flags.writeable = False  # CE freezes the caller's instances here.
    x_kernel = np.ascontiguousarray(x)  # a copy only for strided input
    tables = _tables(explainer, x_kernel, ignore)
    ignored_rows, ignored_sources = _ignored_rows(x_kernel, tables)
    kind = threshold_kind(threshold)
    batch = BatchState(
        x=x_kernel,
        feature_kind=tables["feature_kind"],
        lower=tables["lower"],
        upper=tables["upper"],
        values=tables["values"],
        n_values=tables["n_values"],
        cal_counts=tables["cal_counts"],
        current_is_self=tables["current_is_self"],
        # CE scores n_values[..., 2] identical covered rows per instance x
        # feature and reads them only where current_is_self holds: one row
        # there gives the same means with about half the predictions.
        n_covered=np.where(
            tables["current_is_self"], np.minimum(tables["n_values"][:, :, 2], 1), 0
        ),
        cat_values=tables["cat_values"],
        n_cat_values=tables["n_cat_values"],
        cat_counts=tables["cat_counts"],
        cat_current=tables["cat_current"],
        base_predict=np.ascontiguousarray(prediction["predict"], dtype=np.float64),
        base_low=np.asarray(prediction["low"]),
        base_high=np.asarray(prediction["high"]),
        classes=np.asarray(prediction["classes"]),
        bins=bins_array,
        threshold=(
            np.asarray(threshold).astype(np.float64)
            if kind == "per_instance"
            else threshold
        ),
        threshold_per_instance=kind == "per_instance",
        low_high_percentiles=percentiles,
        interval_summary=interval_summary,
        ignored_rows=ignored_rows,
        ignored_sources=ignored_sources,
        features_to_ignore=np.asarray(ignore),
    )
    if (
        model is None
        or model.explainer is not explainer
        or not model.rule_context.matches(explainer)
    ):
        model = ModelState(
            explainer=explainer,
            num_features=int(x.shape[1]),
            rule_context=RuleContext.of(explainer),
        )
    return FactualPlan(
        explainer=explainer,
        model=model,
        batch=batch,
        x=x,
        prediction=prediction,
        bound_pairs=tables["bound_pairs"],
        threshold=threshold,
        bins=bins,
        features_to_ignore=ignore,
        scores=scores,
        start_time_s=start_time_s,
    )


def explain_chunk(rows: Any, model: ModelState, batch: BatchState) -> dict[str, Any]:
    """Explain the instances ``rows`` of a prepared batch.

    Parameters
    ----------
    rows : array-like of int, range or slice
        Strictly increasing instance indices into the batch.
    model : ModelState
        The calibrated predictor (``plan.model``).
    batch : BatchState
        The batch's arrays (``plan.batch``).

    Returns
    -------
    dict of str to ndarray
        ``rows`` and the :func:`kernels.aggregate_factual` outputs for them,
        plus ``ignored_binned`` (3, c) when features are ignored.

    Raises
    ------
    TypeError
        If the predictor returns non-float64 predictions.
    """
    if isinstance(rows, slice):
        rows = range(*rows.indices(batch.x.shape[0]))
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    with gc_paused():  # the rules allocate many small containers
        return _explain_rows(rows, model, batch)


def _explain_rows(
    rows: np.ndarray, model: ModelState, batch: BatchState
) -> dict[str, Any]:
    perturbed, row_instance, row_feature, row_kind, row_slot = kernels.perturb(
        batch.x,
        rows,
        batch.feature_kind,
        batch.lower,
        batch.upper,
        batch.values,
        batch.n_values,
        batch.cat_values,
        batch.n_cat_values,
        n_covered=batch.n_covered,
    )
    sources = rows[row_instance]
    n_perturbed = sources.shape[0]
    if batch.ignored_rows is not None and batch.ignored_sources is not None:
        perturbed = np.concatenate((perturbed, batch.ignored_rows[rows]))
        sources = np.concatenate((sources, batch.ignored_sources[rows]))
    threshold = (
        batch.threshold[sources] if batch.threshold_per_instance else batch.threshold
    )
    predict, low, high = model.predict(
        perturbed,
        threshold=threshold,
        low_high_percentiles=batch.low_high_percentiles,
        classes=batch.classes[sources],
        bins=None if batch.bins is None else batch.bins[sources],
        interval_summary=batch.interval_summary,
    )
    for name, array in (("predict", predict), ("low", low), ("high", high)):
        if array.dtype != np.float64:
            msg = f"the calibrated {name} must be float64, got {array.dtype}"
            raise TypeError(msg)
    result: dict[str, Any] = kernels.aggregate_factual(
        np.ascontiguousarray(predict[:n_perturbed]),
        np.ascontiguousarray(low[:n_perturbed]),
        np.ascontiguousarray(high[:n_perturbed]),
        row_instance,
        row_feature,
        row_kind,
        row_slot,
        batch.feature_kind,
        batch.n_values[rows],
        batch.cal_counts[rows],
        batch.current_is_self[rows],
        batch.base_predict[rows],
        batch.n_cat_values,
        batch.cat_current[rows],
        batch.cat_counts,
    )
    result["rows"] = rows
    result["rules"], result["conditions"] = chunk_rules(
        rows.tolist(),
        batch.x,
        result["feature_predict"],
        (batch.base_predict, batch.base_low, batch.base_high),
        batch.classes,
        model.rule_context,
        batch.features_to_ignore,
    )
    if batch.ignored_rows is not None:
        result["ignored_binned"] = np.stack(
            (predict[n_perturbed:], low[n_perturbed:], high[n_perturbed:])
        )
    return result
