"""What the factual computation reads from a CalibratedExplainer, and when it can.

calibrated-explanations (CE) 1.0.2 keeps the state a factual explanation
needs spread over its explainer: the calibration matrix, the discretiser's
per-feature bins, the categorical value lists, the percentiles to sample,
the calibrated predictor. This module turns that state into the padded
float64 / int64 tables the kernels take, and decides, before any work, whether
a request is one the kernels reproduce exactly (:func:`is_supported`).

Nothing here imports CE at module level; the explainer is duck-typed.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, final

import numpy as np

__all__ = [
    "DiscretizerTables",
    "ModelState",
    "ScoreMemo",
    "UnsupportedCaseError",
    "categorical_tables",
    "discretizer_tables",
    "is_supported",
    "request_fields",
    "request_value",
    "threshold_kind",
]

_REQUEST_FIELDS: Final = (
    "threshold",
    "low_high_percentiles",
    "bins",
    "features_to_ignore",
    "interval_summary",
    "feature_filter_per_instance_ignore",
)


class UnsupportedCaseError(ValueError):
    """The request is valid for CE but not one the kernels reproduce exactly.

    The caller should run CE's own sequential path instead (and say so with
    a ``FallbackWarning``); ``reason`` names the unsupported feature.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the kernel path does not cover this request ({reason}); "
            "run calibrated-explanations' own sequential path instead"
        )
        self.reason = reason


# Guards installing and removing ScoreMemo's wrapper on a calibrator.
_memo_lock = threading.Lock()


@final
class ScoreMemo:
    """Score a batch with the model once, however often CE asks, in the caller.

    CE's classification calibrator (``VennAbers``) calls the model's
    ``predict_proba`` each time it is asked: for the batch's predictions,
    again for ``__full_probabilities__`` (the same ``x`` object), and once
    more for the plugin's one-row bridge call. While :meth:`installed` is in
    force, those calls on ``x`` reuse the first call's scores (a copy each
    time): two of the caller's three model calls go (a 100-tree forest costs
    ~10 ms a call whatever the rows). Any other input goes to the model as
    before, so worker threads sharing the calibrator see no difference.

    CE copies the bridge's one row, so within ``installed(..., bridge=True)``
    a one-row input equal to the batch's first row is served too. The
    bridge's answer is thrown away (CE only checks that it was used), so this
    changes no output even for a model whose one-row scores differ in the
    last bit from its batch scores.

    Parameters
    ----------
    x : ndarray of shape (n, n_features)
        The validated batch, as :func:`prepare` passes it to CE.
    """

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.first_row = x[:1]  # what the plugin's bridge call passes
        self._scores: np.ndarray | None = None

    @contextlib.contextmanager
    def installed(self, explainer: Any, *, bridge: bool = False) -> Iterator[None]:
        """Serve CE's calls on the batch from the memo within the block.

        Does nothing unless the calibrator is CE's ``VennAbers`` with a plain
        scoring function (no ``bins`` argument), and nothing while another
        memo is installed on it (concurrent calls on one explainer).
        """
        learner = getattr(explainer, "interval_learner", None)
        original = getattr(learner, "_predict_proba", None)
        code = getattr(original, "__code__", None)
        with _memo_lock:
            usable = (
                code is not None
                and "bins" not in code.co_varnames
                and not getattr(original, "score_memo", False)
            )
            if usable:
                wrapper = self._wrap(original, bridge)
                learner._predict_proba = wrapper  # type: ignore[union-attr]
        try:
            yield
        finally:
            if usable:
                with _memo_lock:
                    if learner.__dict__.get("_predict_proba") is wrapper:
                        learner._predict_proba = original  # type: ignore[union-attr]

    def _is_first_row(self, rows: Any) -> bool:
        first = self.first_row
        return (
            isinstance(rows, np.ndarray)
            and rows.shape == first.shape
            and np.array_equal(rows, first)
        )

    def _wrap(self, original: Any, bridge: bool) -> Any:
        def scores(rows: Any, *args: Any, **kwargs: Any) -> Any:
            if rows is self.x or (bridge and self._is_first_row(rows)):
                if self._scores is None:
                    self._scores = np.asarray(original(self.x, *args, **kwargs))
                return self._scores[: len(rows)].copy()
            return original(rows, *args, **kwargs)

        scores.score_memo = True  # type: ignore[attr-defined]
        return scores


@final
@dataclass(frozen=True)
class ModelState:
    """The calibrated predictor a worker needs, pickled once per worker.

    Attributes
    ----------
    explainer : CalibratedExplainer
        CE's explainer; only its prediction orchestrator is used. CE's own
        ``__getstate__`` drops caches, helpers and the last explanation when
        it is pickled.
    num_features : int
        Number of features.
    rule_context : RuleContext
        What CE's rules read of the explainer (discretiser, names), taken
        with the model so that workers compute rules with the same objects.

    Notes
    -----
    Safe to share between threads: CE's regression calibrator stores the
    threshold it is scoring on itself (``IntervalRegressor.y_threshold``), so
    thresholded predictions run one at a time under a per-process lock.
    """

    explainer: Any
    num_features: int
    rule_context: Any
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def __getstate__(self) -> dict[str, Any]:
        return {
            "explainer": self.explainer,
            "num_features": self.num_features,
            "rule_context": self.rule_context,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in (*state.items(), ("_lock", threading.Lock())):
            object.__setattr__(self, name, value)

    def predict(
        self,
        x: np.ndarray,
        *,
        threshold: Any,
        low_high_percentiles: tuple[float, float],
        classes: np.ndarray,
        bins: np.ndarray | None,
        interval_summary: Any,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return CE's calibrated (predict, low, high) for the rows of ``x``.

        The call is the one CE's ``explain_predict_step`` makes for its
        perturbed matrix, so the result is the same numbers.
        """
        lock = self._lock if threshold is not None else contextlib.nullcontext()
        with lock:
            predict, low, high, _ = (
                self.explainer.prediction_orchestrator.predict_internal(
                    x,
                    threshold=threshold,
                    low_high_percentiles=low_high_percentiles,
                    classes=classes,
                    bins=bins,
                    interval_summary=interval_summary,
                )
            )
        return np.array(predict), np.array(low), np.array(high)


@final
@dataclass(frozen=True)
class DiscretizerTables:
    """CE's discretiser as padded tables (see :func:`kernels.rule_boundaries`)."""

    mins: np.ndarray
    maxs: np.ndarray
    means: np.ndarray
    n_bins: np.ndarray


def request_value(request: Any, name: str, default: Any = None) -> Any:
    """Read one field of a CE ExplanationRequest, a mapping or None."""
    if request is None:
        return default
    if isinstance(request, Mapping):
        return request.get(name, default)
    return getattr(request, name, default)


def request_fields(request: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`prepare` from a CE ExplanationRequest.

    Parameters
    ----------
    request : ExplanationRequest, mapping or None
        What CE hands a plugin's ``explain_batch``.

    Returns
    -------
    dict
        ``threshold``, ``low_high_percentiles``, ``bins``,
        ``features_to_ignore`` and ``interval_summary``.
    """
    return {
        "threshold": request_value(request, "threshold"),
        "low_high_percentiles": request_value(request, "low_high_percentiles"),
        "bins": request_value(request, "bins"),
        "features_to_ignore": request_value(request, "features_to_ignore"),
        "interval_summary": request_value(request, "interval_summary"),
    }


def threshold_kind(threshold: Any) -> str:
    """Classify a threshold: none, scalar, interval, per_instance or ''.

    An empty string means a form the kernel path does not support (a list of
    interval tuples, or anything non-numeric).
    """
    if threshold is None:
        return "none"
    if isinstance(threshold, tuple):
        ok = len(threshold) == 2 and all(isinstance(v, numbers.Real) for v in threshold)
        return "interval" if ok else ""
    if isinstance(threshold, numbers.Real) and not isinstance(threshold, bool):
        return "scalar"
    if isinstance(threshold, (list, np.ndarray)):
        array = np.asarray(threshold)
        if array.ndim == 1 and array.size and array.dtype.kind in "iuf":
            return "per_instance"
    return ""


def discretizer_tables(discretizer: Any, num_features: int) -> DiscretizerTables:
    """Pack CE's discretiser (to_discretize, mins, maxs, means) into tables.

    Raises
    ------
    UnsupportedCaseError
        If the discretiser is missing or its bins are not ascending tables
        of equal lengths.
    """
    if discretizer is None:
        reason = "no discretizer is set on the explainer"
        raise UnsupportedCaseError(reason)
    try:
        features = [int(f) for f in discretizer.to_discretize]
        per_feature = {
            f: tuple(
                np.asarray(getattr(discretizer, name)[f], dtype=np.float64).reshape(-1)
                for name in ("mins", "maxs", "means")
            )
            for f in features
        }
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        reason = f"discretizer {type(discretizer).__name__} lacks usable bins: {exc}"
        raise UnsupportedCaseError(reason) from exc
    width = max((len(t[0]) for t in per_feature.values()), default=1)
    tables = np.zeros((3, num_features, max(width, 1)))
    n_bins = np.zeros(num_features, dtype=np.int64)
    for f, (mins, maxs, means) in per_feature.items():
        if not (0 <= f < num_features) or not (
            len(mins) == len(maxs) == len(means) > 0
        ):
            reason = f"discretizer bins of feature {f} have unequal or empty lengths"
            raise UnsupportedCaseError(reason)
        edges = mins[1:]
        has_nan = any(np.isnan(t).any() for t in (mins, maxs, means))
        if has_nan or np.any(edges[1:] < edges[:-1]):
            reason = f"discretizer bins of feature {f} are NaN or not ascending"
            raise UnsupportedCaseError(reason)
        tables[0, f, : len(mins)] = mins
        tables[1, f, : len(maxs)] = maxs
        tables[2, f, : len(means)] = means
        n_bins[f] = len(mins)
    return DiscretizerTables(
        np.ascontiguousarray(tables[0]),
        np.ascontiguousarray(tables[1]),
        np.ascontiguousarray(tables[2]),
        n_bins,
    )


def categorical_tables(
    explainer: Any, x: np.ndarray, x_cal: np.ndarray, categorical: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Values, value counts, calibration counts and current value per feature.

    Returns ``cat_values`` (n_features, width), ``n_cat_values``,
    ``cat_counts`` (n_features, width) and ``cat_current`` (n, n_features),
    the last index whose value equals the instance's (CE's dict lookup), -1
    if none. Loops over categorical features only.
    """
    n, num_features = x.shape
    value_lists = {
        int(f): np.asarray(_feature_values(explainer, int(f)), dtype=np.float64)
        for f in categorical
    }
    width = max((v.size for v in value_lists.values()), default=0)
    cat_values = np.zeros((num_features, max(width, 1)))
    cat_counts = np.zeros((num_features, max(width, 1)))
    n_cat_values = np.zeros(num_features, dtype=np.int64)
    cat_current = np.full((n, num_features), -1, dtype=np.int64)
    for f, values in value_lists.items():
        n_cat_values[f] = values.size
        cat_values[f, : values.size] = values
        cat_counts[f, : values.size] = (x_cal[:, f][None, :] == values[:, None]).sum(
            axis=1
        )
        matches = x[:, f][:, None] == values[None, :]
        last = values.size - 1 - np.argmax(matches[:, ::-1], axis=1)
        cat_current[:, f] = np.where(matches.any(axis=1), last, -1)
    return cat_values, n_cat_values, cat_counts, cat_current


def _feature_values(explainer: Any, feature: int) -> Any:
    """CE's feature_task lookup of explainer.feature_values[feature]."""
    feature_values = getattr(explainer, "feature_values", {})
    if isinstance(feature_values, dict):
        values = feature_values.get(feature, [])
    else:
        values = feature_values[feature]
    return values if isinstance(values, (list, tuple, np.ndarray)) else list(values)


def _explainer_reason(explainer: Any) -> str:
    mode = getattr(explainer, "mode", None)
    if mode not in ("classification", "regression"):
        return f"explainer mode {mode!r}"
    if not hasattr(explainer, "prediction_orchestrator"):
        return f"{type(explainer).__name__} is not a CalibratedExplainer"
    is_fast = getattr(explainer, "is_fast", None)
    if callable(is_fast) and is_fast():
        return "fast (perturbed-calibration) explainers"
    feature_filter = getattr(explainer, "feature_filter_config", None)
    if getattr(feature_filter, "enabled", False) is True:
        return "CE's FAST-based feature filter is enabled"
    if len(getattr(explainer, "sample_percentiles", ())) == 0:
        return "empty sample_percentiles"
    return ""


def _data_reason(explainer: Any, x: Any) -> str:
    x_array = np.asarray(getattr(x, "values", x))
    if x_array.dtype != np.float64:
        return f"x of dtype {x_array.dtype} (CE assigns perturbed values in that dtype)"
    if x_array.ndim not in (1, 2) or np.isnan(x_array).any():
        return "x must be a NaN-free 1-D or 2-D array"
    x_cal = np.asarray(explainer.x_cal)
    if x_cal.dtype.kind not in "iuf" or np.isnan(x_cal.astype(np.float64)).any():
        return "calibration data must be numeric and NaN-free"
    return ""


def _categorical_reason(explainer: Any, ignored: set[int]) -> str:
    for f in getattr(explainer, "categorical_features", ()):
        if int(f) in ignored:
            continue
        values = np.asarray(_feature_values(explainer, int(f)))
        if values.size == 0 or values.dtype.kind not in "iuf":
            return f"categorical feature {f} has no numeric feature_values"
        if np.unique(values).size != values.size:
            return f"categorical feature {f} has repeated feature_values"
    return ""


def is_supported(explainer: Any, x: Any, request: Any = None) -> tuple[bool, str]:
    """Tell whether the kernel path reproduces CE's factual output for a call.

    Parameters
    ----------
    explainer : CalibratedExplainer
        CE's explainer, after ``explain_factual`` has set its discretiser
        (inside a plugin's ``explain_batch`` this always holds).
    x : array-like
        The instances to explain.
    request : ExplanationRequest, mapping or None
        CE's request fields: ``threshold``, ``low_high_percentiles``,
        ``bins``, ``features_to_ignore``, ``interval_summary``,
        ``feature_filter_per_instance_ignore``.

    Returns
    -------
    supported : bool
        True if :func:`prepare` may be called.
    reason : str
        Empty when supported, else what is not covered, for the
        ``FallbackWarning``.

    Notes
    -----
    A few data-dependent cases are only found by :func:`prepare`, which then
    raises :class:`UnsupportedCaseError`; treat that exception the same way.
    """
    reason = _explainer_reason(explainer)
    if not reason and request_value(request, "feature_filter_per_instance_ignore"):
        reason = "per-instance features_to_ignore"
    if not reason and not threshold_kind(request_value(request, "threshold")):
        reason = "thresholds given as a list of intervals, or non-numeric"
    if not reason:
        reason = _data_reason(explainer, x)
    if not reason:
        try:
            ignored = {int(f) for f in getattr(explainer, "features_to_ignore", ())}
            ignored |= {
                int(f) for f in request_value(request, "features_to_ignore") or ()
            }
        except (TypeError, ValueError):
            ignored = set()
            reason = "features_to_ignore given by name"
    if not reason:
        if len(ignored & set(range(explainer.num_features))) == explainer.num_features:
            reason = "every feature is ignored"
        else:
            reason = _categorical_reason(explainer, ignored)
    if not reason:
        try:
            discretizer_tables(
                getattr(explainer, "discretizer", None), explainer.num_features
            )
        except UnsupportedCaseError as exc:
            reason = exc.reason
    return (not reason, reason)
