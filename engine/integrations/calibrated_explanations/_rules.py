"""CE's factual rules, computed where the chunk is computed.

calibrated-explanations (CE) 1.0.x builds each ``FactualExplanation``'s rules
eagerly in its constructor (``get_rules``: rule texts from the discretiser,
value strings, one ``ConjunctionState.add_rule`` per feature). That is pure
Python, 1-2 ms per instance on W1-W3, and it was ~75 % of the caller's time
building explanations, which no worker could share. This module splits it:

- in the worker (:func:`chunk_rules`), CE's own ``FactualExplanation
  .get_rules`` runs on a shell explanation that holds exactly the per-instance
  state the method reads, with a stand-in collection whose explainer is a
  :class:`RuleContext` (the attributes ``get_rules`` and ``define_conditions``
  read). The rules and conditions travel back with the chunk result;
- in the caller (:func:`build_explanation`), the explanation is built with
  CE's base constructor and the rules set, which is what CE's
  ``FactualExplanation.__init__`` does, minus the rule computation.

The rules' ``sampled_values`` are objects of the caller's binned dicts in CE
(``binned["rule_values"][f][0][-1]``), so workers leave them out and the
caller links them, which also keeps them out of the pickles.

Only CE 1.0.x (the ``ce`` extra pins ``<1.1``) is covered: the constructor
body repeated here is that version's. The identity tests compare every
attribute of every explanation with CE's own.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, final

import numpy as np

__all__ = ["RuleContext", "build_explanation", "chunk_rules", "gc_paused"]

_KEYS = ("predict", "low", "high")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while CE objects are created.

    Building explanations and rules allocates many small containers while
    the explainer (and, in the caller, its deep copies) are alive, so
    generation-2 collections keep re-walking them: one took 177 ms in a W3
    worker (277,000 tracked objects); pausing took the caller's assembly
    from 1.19 s to 0.75 s on W3 and from 0.22 s to 0.16 s on W1 (median of
    5). These containers hold no reference cycles, so nothing waits for the
    collector; it runs again on exit. The previous state is restored.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@final
@dataclass(frozen=True)
class RuleContext:
    """What ``get_rules`` reads of the explainer, taken when the model is shared.

    CE's collection hands its explanations a deep copy of the explainer; the
    rules read only these attributes of it. :meth:`matches` tells whether the
    explainer still holds the same objects (CE keeps its discretiser object
    between ``explain_factual`` calls), so a stale context is never used.
    """

    num_features: int
    feature_names: Any
    categorical_features: Any
    categorical_labels: Any
    discretizer: Any

    @classmethod
    def of(cls, explainer: Any) -> RuleContext:
        """Take the context from a calibrated explainer."""
        return cls(
            num_features=int(explainer.num_features),
            feature_names=explainer.feature_names,
            categorical_features=explainer.categorical_features,
            categorical_labels=explainer.categorical_labels,
            discretizer=explainer.discretizer,
        )

    def matches(self, explainer: Any) -> bool:
        """Return True if ``explainer`` still holds the very same objects."""
        return (
            self.num_features == explainer.num_features
            and self.feature_names is explainer.feature_names
            and self.categorical_features is explainer.categorical_features
            and self.categorical_labels is explainer.categorical_labels
            and self.discretizer is explainer.discretizer
        )


@final
class _Collection:
    """Stand-in for CE's CalibratedExplanations while rules are computed.

    ``FactualExplanation.get_explainer`` calls ``get_explainer()`` on its
    collection; ``ignored_features_for_instance`` reads the two ignore
    attributes (per-instance ignoring always falls back to CE's own path).
    """

    __slots__ = ("_context", "feature_filter_per_instance_ignore", "features_to_ignore")

    def __init__(self, context: RuleContext, features_to_ignore: Any) -> None:
        self._context = context
        self.features_to_ignore = features_to_ignore
        self.feature_filter_per_instance_ignore = None

    def get_explainer(self) -> RuleContext:
        return self._context


def chunk_rules(
    rows: Sequence[int],
    x: np.ndarray,
    feature_predict: np.ndarray,
    prediction: Sequence[np.ndarray],
    classes: np.ndarray,
    context: RuleContext,
    features_to_ignore: Any,
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Run CE's ``get_rules`` for the instances ``rows`` of a batch.

    Parameters
    ----------
    rows : sequence of int
        Instance indices into the batch, in chunk order.
    x : ndarray of shape (n, F)
        The batch's instances.
    feature_predict : ndarray of shape (3, len(rows), F)
        Per-feature predict / low / high of the chunk, in ``rows`` order.
    prediction : (predict, low, high) of ndarrays of shape (n,)
        The batch's calibrated predictions, as CE's prediction dict holds them.
    classes : ndarray of shape (n,)
        CE's ``prediction["classes"]``.
    context : RuleContext
        The explainer's attributes that the rules read.
    features_to_ignore : array-like of int
        The collection's ignored features.

    Returns
    -------
    rules : list of dict
        CE's rules of each instance, ``sampled_values`` set to None and
        float lists packed (:func:`build_explanation` unpacks them).
    conditions : list of list of str
        CE's rule conditions of each instance.
    """
    from calibrated_explanations.explanations.explanation import FactualExplanation

    collection = _Collection(context, features_to_ignore)
    # get_rules reads binned["rule_values"][f][0][-1] only to store it.
    rule_values = dict.fromkeys(range(context.num_features), ((None,),))
    out_rules: list[dict[str, Any]] = []
    out_conditions: list[list[str]] = []
    for k, i in enumerate(rows):
        shell = FactualExplanation.__new__(FactualExplanation)
        shell.__dict__.update(
            calibrated_explanations=collection,
            index=i,
            x_test=x[i],
            binned={"rule_values": rule_values},
            feature_predict={key: feature_predict[t, k] for t, key in enumerate(_KEYS)},
            prediction={
                **{key: prediction[t][i] for t, key in enumerate(_KEYS)},
                "classes": classes[i],
            },
            conditions=[],
            rules=None,
            has_rules=False,
            conjunctive_rules=None,
            has_conjunctive_rules=False,
        )
        rules = shell.get_rules()
        rules["sampled_values"] = None
        out_rules.append(_pack(rules))
        out_conditions.append(shell.conditions)
    return out_rules, out_conditions


@final
class _Floats:
    """A rules list of numpy float64 scalars, carried as one array."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Floats, (self.array,))

    def __eq__(self, other: object) -> bool:
        return type(other) is _Floats and np.array_equal(self.array, other.array)

    __hash__ = None  # type: ignore[assignment]  # mutable contents, as a list


def _pack(rules: dict[str, Any]) -> dict[str, Any]:
    """Carry each list of float64 scalars as one array (cheap to pickle).

    A list of 256 numpy scalars pickles one object at a time, which was most
    of a W2 chunk result's pickling time; the caller rebuilds the very same
    scalars (:func:`_unpack`). Lists holding anything else (a Python float
    ``inf`` in CE's weight bounds, strings, ints) travel as they are.
    """
    out: dict[str, Any] = {}
    for key, values in rules.items():
        if (
            type(values) is list
            and values
            and all(type(value) is np.float64 for value in values)
        ):
            out[key] = _Floats(np.array(values, dtype=np.float64))
        else:
            out[key] = values
    return out


def _unpack(rules: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`_pack`: lists of numpy float64 scalars, keys in order."""
    return {
        key: list(value.array) if type(value) is _Floats else value
        for key, value in rules.items()
    }


def build_explanation(
    collection: Any,
    index: int,
    x_row: Any,
    binned: Any,
    feature_weights: Any,
    feature_predict: Any,
    prediction: Any,
    rules: dict[str, Any],
    conditions: list[str],
    *,
    instance_bin: Any,
) -> Any:
    """Build CE's ``FactualExplanation`` with rules computed by :func:`chunk_rules`.

    Does what CE 1.0.x's ``FactualExplanation.__init__`` does: the base
    constructor, ``_check_preconditions``, the rules (here given, with their
    ``sampled_values`` linked to this explanation's binned values, as CE's
    ``get_rules`` stores them) and the cached prediction probabilities.
    """
    from calibrated_explanations.explanations.explanation import (
        CalibratedExplanation,
        FactualExplanation,
    )

    explanation = FactualExplanation.__new__(FactualExplanation)
    CalibratedExplanation.__init__(
        explanation,
        collection,
        index,
        x_row,
        binned,
        feature_weights,
        feature_predict,
        prediction,
        collection.y_threshold,
        instance_bin=instance_bin,
        condition_source=collection.condition_source,
    )
    explanation._check_preconditions()  # a step of CE's constructor
    explanation.conditions = conditions
    rules = _unpack(rules)
    rule_values = explanation.binned["rule_values"]
    rules["sampled_values"] = [rule_values[f][0][-1] for f in rules["feature"]]
    explanation.rules = rules
    explanation.has_rules = True
    _cache_probabilities(explanation)
    return explanation


def _cache_probabilities(explanation: Any) -> None:
    """CE's cached probability matrix (classification only).

    CE gives explanation 0 the batch's matrix and every later one explanation
    0's, so all hold the same object; regression explanations get no attribute.
    """
    try:
        if explanation.is_regression():
            return
        full = explanation.prediction.get("__full_probabilities__")
        if isinstance(full, tuple) and len(full) >= 1:
            full = full[0]
        explanation.prediction_probabilities = full
    except Exception:  # CE's constructor swallows these too
        explanation.prediction_probabilities = None
