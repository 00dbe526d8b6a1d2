"""Build CE's own CalibratedExplanations from chunk results, in the caller.

calibrated-explanations (CE) keeps a factual explanation as nested Python
containers: per instance, one dict per field (predict, low, high,
current_bin, counts, fractions, rule_values) keyed by feature. This module
rebuilds exactly those containers from the chunk arrays, and lets CE create
the objects: ``initialize_explanation`` makes the collection and
``FactualExplanation`` each explanation and its rules.

:class:`FactualAssembler` does this chunk by chunk, so a caller streaming
results (``ParallelExecutor.imap``) builds explanations while workers are
still computing; the CE objects are ~40 % of the end-to-end time on W2-W3.
It repeats the loop of CE's ``CalibratedExplanations.finalize`` (a
``FactualExplanation`` per instance, in index order) because ``finalize``
needs every instance at once.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from time import time
from typing import Any, final

import numpy as np

import kernels

from ._ce_state import UnsupportedCaseError
from ._factual import FactualPlan, add_full_probabilities
from ._rules import build_explanation, gc_paused

__all__ = ["FactualAssembler", "assemble"]

_BINNED_KEYS = (
    "predict",
    "low",
    "high",
    "current_bin",
    "rule_values",
    "counts",
    "fractions",
)
_BOUNDS = ("predict", "low", "high")


def _feature_values(explainer: Any) -> dict[int, Any]:
    """CE's feature_task lookup of each feature's value list."""
    values = getattr(explainer, "feature_values", {})
    out: dict[int, Any] = {}
    for f in range(explainer.num_features):
        entry = values.get(f, []) if isinstance(values, dict) else values[f]
        out[f] = entry if isinstance(entry, (list, tuple, np.ndarray)) else list(entry)
    return out


def _first_equal(keys: np.ndarray) -> np.ndarray:
    """Per column, the smallest row index holding an equal key (vectorised).

    CE computes one lesser (greater, covered) value array per distinct bound
    and shares it between the instances with that bound; this finds, for
    every instance, the instance whose array to share.
    """
    n = keys.shape[0]
    order = np.argsort(keys, axis=0, kind="stable")
    ordered = np.take_along_axis(keys, order, axis=0)
    starts = np.zeros(keys.shape, dtype=np.int64)
    starts[1:] = np.where(ordered[1:] != ordered[:-1], np.arange(1, n)[:, None], 0)
    starts = np.maximum.accumulate(starts, axis=0)
    first = np.empty_like(order)
    np.put_along_axis(first, order, np.take_along_axis(order, starts, axis=0), axis=0)
    return first


_ABSENT = object()


@final
class _SnapshotOnCopy:
    """The assembler's collection's explainer: live until CE copies it.

    CE's ``CalibratedExplanations`` deep-copies the explainer, learner
    included, into a frozen snapshot (10-45 ms on W1-W3). The plugin's
    collection is only a template: CE's orchestrator rebuilds the collection
    it returns with ``from_batch``, which deep-copies the template's
    snapshot. So the template's copy is made here at that moment, from the
    explainer's attributes as they were when the template was made (CE's
    own copy time; the plugin rebinds ``_last_explanation_mode`` and
    ``latest_explanation`` in between): one copy per call instead of two, and
    the same snapshot in the returned collection. Until then it reads through
    to the live explainer (the explanations being built read it).
    """

    def __init__(self, explainer: Any) -> None:
        self._live = explainer
        self._state = dict(vars(explainer))  # bindings at CE's copy time
        # CE's copy drops the previous explanation (1.0.2's __deepcopy__ sets
        # it to None). Holding it here linked every call's template to the
        # previous call's collection, which held its snapshot, and so on:
        # W1 kept a 100-tree forest copy per explain_factual call, and the
        # caller's full GC passes grew to 0.2-0.7 s.
        if "latest_explanation" in self._state:
            self._state["latest_explanation"] = None
        self._armed = False  # the collection's own constructor: no copy yet

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live, name)

    def arm(self) -> None:
        """From now on a deep copy snapshots the explainer (``from_batch``)."""
        self._armed = True

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if not self._armed:
            return self
        live = vars(self._live)
        now = dict(live)
        try:
            # CE's own snapshot would not see what was rebound since.
            for key in now.keys() - self._state.keys():
                del live[key]
            live.update(
                {k: v for k, v in self._state.items() if now.get(k, _ABSENT) is not v}
            )
            return copy.deepcopy(self._live, memo)
        finally:
            for key in live.keys() - now.keys():
                del live[key]
            live.update(now)


@final
class FactualAssembler:
    """Build CE's CalibratedExplanations as chunk results arrive.

    Parameters
    ----------
    plan : FactualPlan
        The plan :func:`prepare` returned.
    defer_snapshot : bool
        The collection is a template that CE's ``from_batch`` copies (the
        plugin's case): take its explainer snapshot then, not now
        (:class:`_SnapshotOnCopy`). Leave False when the collection itself
        is handed to users (:func:`assemble`).

    Notes
    -----
    Creating the assembler runs CE's ``initialize_explanation`` (without
    ``defer_snapshot``, a deep copy of the explainer, 10-45 ms on W1-W3):
    create it after dispatching the chunks to overlap that with the workers.
    Called from the caller's thread only.
    """

    def __init__(self, plan: FactualPlan, *, defer_snapshot: bool = False) -> None:
        from calibrated_explanations.core.prediction_helpers import (
            initialize_explanation,
        )

        batch = plan.batch
        self._plan = plan
        self._n, self._num_features = batch.x.shape
        add_full_probabilities(plan)
        snapshot = _SnapshotOnCopy(plan.explainer) if defer_snapshot else None
        with gc_paused():
            self._collection = initialize_explanation(
                plan.explainer if snapshot is None else snapshot,
                plan.x,
                batch.low_high_percentiles,
                plan.threshold,
                plan.bins,
                plan.features_to_ignore,
            )
        if snapshot is not None:
            snapshot.arm()
        if self._collection.is_alternative():
            reason = "the explainer holds an alternative-explanation discretizer"
            raise UnsupportedCaseError(reason)
        self._start_s = time()
        self._kinds = batch.feature_kind.tolist()
        self._feature_values = _feature_values(plan.explainer)
        self._owners = (
            _first_equal(batch.lower).tolist(),
            _first_equal(batch.upper).tolist(),
            _first_equal(plan.bound_pairs).tolist(),
        )
        self._shared: dict[tuple[int, int, int], np.ndarray] = {}
        self._binned: dict[str, list[Any]] = {
            key: [None] * self._n for key in _BINNED_KEYS
        }
        self._weights: dict[str, list[Any]] = {key: [None] * self._n for key in _BOUNDS}
        self._predict: dict[str, list[Any]] = {key: [None] * self._n for key in _BOUNDS}
        self._explanations: list[Any] = [None] * self._n

    def _values(self, side: int, f: int, owner: int) -> np.ndarray:
        """The shared value array of ``side`` for feature f, owned by ``owner``."""
        key = (side, f, owner)
        array = self._shared.get(key)
        if array is None:
            batch = self._plan.batch
            if side == kernels.COVERED:
                owner = int(self._plan.bound_pairs[owner, f])
            size = batch.n_values[owner, f, side]
            array = self._shared[key] = batch.values[owner, f, side, :size]
        return array

    def _rule_values(self, i: int, x_row: list[Any]) -> dict[int, Any]:
        """CE's rule_values of instance i: (value arrays, x_f, x_f) per feature."""
        n_values = self._plan.batch.n_values[i].tolist()
        lower_owner, upper_owner, pair_owner = (o[i] for o in self._owners)
        out: dict[int, Any] = {}
        for f, kind in enumerate(self._kinds):
            if kind != kernels.NUMERIC:
                out[f] = (self._feature_values[f], x_row[f], x_row[f])
                continue
            arrays = []
            if n_values[f][kernels.LESSER]:
                arrays.append(self._values(kernels.LESSER, f, lower_owner[f]))
            if n_values[f][kernels.GREATER]:
                arrays.append(self._values(kernels.GREATER, f, upper_owner[f]))
            # CE reports the covered values of instance j, the bound-pair number.
            arrays.append(self._values(kernels.COVERED, f, pair_owner[f]))
            out[f] = (arrays, x_row[f], x_row[f])
        return out

    def _binned_entry(
        self, result: dict[str, Any], k: int, i: int
    ) -> dict[str, dict[int, Any]]:
        """CE's binned dicts of instance i (row k of a chunk result)."""
        features = range(self._num_features)
        sizes = result["n_binned"][k]
        current = result["current_bin"][k]
        in_range = (current >= 0) & (current < sizes)
        sizes_list = sizes.tolist()
        entry: dict[str, dict[int, Any]] = {}
        for t, key in enumerate(_BOUNDS):
            rows = result["binned"][t, k]
            entry[key] = {
                f: row[:s] for f, row, s in zip(features, rows, sizes_list, strict=True)
            }
        entry["counts"] = {
            f: row[:s]
            for f, row, s in zip(features, result["counts"][k], sizes_list, strict=True)
        }
        entry["fractions"] = {
            f: row[:s]
            for f, row, s in zip(
                features,
                result["fractions"][k],
                (sizes - in_range).tolist(),
                strict=True,
            )
        }
        entry["current_bin"] = dict(zip(features, current, strict=True))
        empty = np.array([], dtype=float)
        for f, kind in enumerate(self._kinds):
            if kind == kernels.IGNORED:
                # CE stores row i of its perturbed predictions here (a CE quirk).
                for t, key in enumerate(_BOUNDS):
                    entry[key][f] = result["ignored_binned"][t, k]
                entry["current_bin"][f] = -1
                entry["counts"][f] = empty
                entry["fractions"][f] = empty
        return entry

    def add(self, result: dict[str, Any]) -> None:
        """Build the explanations of one :func:`explain_chunk` result.

        Raises
        ------
        ValueError
            If the result holds an instance already added or out of range.
        """
        rows = np.asarray(result["rows"]).tolist()
        if any(not 0 <= i < self._n or self._explanations[i] is not None for i in rows):
            msg = f"chunk rows {rows[:20]} repeat an instance or leave 0..{self._n - 1}"
            raise ValueError(msg)
        with gc_paused():
            self._add(result, rows)

    def _add(self, result: dict[str, Any], rows: list[int]) -> None:
        collection = self._collection
        batch = self._plan.batch
        for k, i in enumerate(rows):
            x_row = list(batch.x[i])
            entry = self._binned_entry(result, k, i)
            entry["rule_values"] = self._rule_values(i, x_row)
            for key in _BINNED_KEYS:
                self._binned[key][i] = entry[key]
            for t, key in enumerate(_BOUNDS):
                self._weights[key][i] = result["weights"][t, k].copy()
                self._predict[key][i] = result["feature_predict"][t, k].copy()
            # The body of CE's CalibratedExplanations.finalize, for instance i,
            # with the rules the chunk computed.
            self._explanations[i] = build_explanation(
                collection,
                i,
                self._plan.x[i],
                self._binned,
                self._weights,
                self._predict,
                self._plan.prediction,
                result["rules"][k],
                result["conditions"][k],
                instance_bin=collection.bins[i]
                if collection.bins is not None
                else None,
            )

    def finish(self) -> Any:
        """Return the CalibratedExplanations once every instance was added.

        Raises
        ------
        ValueError
            If some instance has no result.
        """
        missing = [i for i, e in enumerate(self._explanations) if e is None]
        if missing:
            msg = f"no chunk result for instances {missing[:20]}; add every chunk first"
            raise ValueError(msg)
        elapsed_s = time() - self._start_s
        collection = self._collection
        for explanation in self._explanations:
            explanation.explain_time = elapsed_s / self._n
        collection.explanations.extend(self._explanations)
        collection.total_explain_time = time() - self._plan.start_time_s
        explainer = self._plan.explainer
        explainer.latest_explanation = collection
        explainer.last_explanation_mode = explainer.infer_explanation_mode()
        return collection


def assemble(plan: FactualPlan, results: Sequence[dict[str, Any]]) -> Any:
    """Build CE's CalibratedExplanations from the chunk results.

    Parameters
    ----------
    plan : FactualPlan
        The plan :func:`prepare` returned.
    results : sequence of dict
        :func:`explain_chunk` results covering every instance once, in any
        order.

    Returns
    -------
    CalibratedExplanations
        The collection CE's sequential factual plugin builds (before CE's
        orchestrator turns it into a batch and back).

    Raises
    ------
    ValueError
        If the results do not cover the batch's instances exactly once.
    """
    assembler = FactualAssembler(plan)
    for result in results:
        assembler.add(result)
    return assembler.finish()
