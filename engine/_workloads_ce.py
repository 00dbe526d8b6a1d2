"""The calibrated-explanations workloads of BENCH.md (W1-W3) for the ablation.

Each workload fits a RandomForestClassifier once (``build``, not timed) and
then runs one timed ``explain_factual`` call per repetition under a named
configuration. CE configurations need a calibrated explainer, not a mapper, so
:class:`CEWorkload` overrides ``run(name)``: it calibrates one explainer per
configuration on first use, keeps it (and its pool) warm, and closes every
pool in ``close()``.

Configurations:

- ``ce-sequential``: CE 1.0.2's default plugin
  (``core.explanation.factual.sequential``); the baseline.
- ``ce-default``: CE's own parallel at its fixed default, enabled the way CE
  documents it (``ExplainerBuilder.perf_parallel``): processes, 2 workers,
  chunks of 8 instances, plugin ``core.explanation.factual.instance_parallel``.
- ``ce-tuned``: CE's best tuned parallel (BENCH.md): the same plugin with
  ``instance_chunk_size=ceil(n/2)``.
- ``serial``, ``threads``, ``processes-fork``, ``processes-spawn``, ``auto``:
  our plugin (``engine.integrations.calibrated_explanations.enable``) under
  ``ParallelConfig(**STRATEGY_CONFIGS[name])``.

CE shuts its own process pool down at the end of every ``explain_factual``
call (``ExplainParallelRuntime.__exit__``), so ``ce-default`` and ``ce-tuned``
pay a (fork) pool start per call; that is CE's behaviour, measured as is.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from engine import ParallelConfig, ParallelExecutor
from engine._workloads import STRATEGY_CONFIGS, Workload, ce_installed, config_available

CE_CONFIGS: Final = ("ce-sequential", "ce-default", "ce-tuned")
OUR_CONFIGS: Final = ("serial", "threads", "processes-fork", "processes-spawn", "auto")
CE_CONFIG_NAMES: Final = CE_CONFIGS + OUR_CONFIGS
# ablate --quick must finish in 3 minutes on 2 cores, and each of W1-W3's
# pools cost 3.6-4.6 s to warm up (its workers import scikit-learn and load
# the kernels), a fifth of the budget for the three. A warm spawn pool runs
# the very code a warm fork pool runs (ablate runs 7-14: spawn's W1-W3
# medians at 0.78-1.21x of fork's, noise both ways, median 0.99x). The full
# ablation, W4-W7 and ci/bench/ce.py still measure processes-spawn.
QUICK_SKIPS: Final = {
    "processes-spawn": "--quick: a warm spawn pool runs what processes-fork runs; "
    "run without --quick to measure it",
}
BASELINE: Final = "ce-sequential"
CE_INSTANCE_PARALLEL: Final = "core.explanation.factual.instance_parallel"
CE_WORKERS: Final = 2
PLUGIN_MODULE: Final = "engine.integrations.calibrated_explanations"
# Issue 5: "feature weights and feature predictions ... equal within 1e-9".
IDENTITY_ATOL: Final = 1e-9
# Parts of a CE explanation that legitimately depend on how the caller's batch
# is chunked (CE-PLUGIN-NOTES.md section 5, "Batch composition"):
# ``prediction["__full_probabilities__"]`` holds the probability matrix of the
# whole batch the explanation was computed in, and the rules' ``sampled_values``
# come from the current-bin lookup under the index of the instance's unique
# bound pair within that batch. CE's own instance_parallel plugin changes both.
BATCH_DEPENDENT: Final = ("prediction.__full_probabilities__", "rules.sampled_values")


@dataclass(frozen=True)
class CaseSpec:
    """Data and split of one CE workload (BENCH.md)."""

    id: str
    title: str
    n_test: int
    n_test_quick: int
    n_cal: int
    # None means sklearn's load_breast_cancer; else make_classification.
    n_features: int | None = None
    n_informative: int = 0
    n_redundant: int = 0


# Quick sizes: CE sequential took 20-25 ms an instance on W1, 50 ms on W2 and
# 190 ms on W3 (ci/bench/ce.py, 2 busy cores). With 5 rounds and the paired
# rounds, 20 rows on W1 and W2 made ``ablate --quick`` take 145-176 s of its
# 3 minutes (the three CE configurations about 55 s of it); 12 rows keep it
# well inside. W3 keeps 10 rows: with fewer than 9, CE's default chunk of 8
# is a single chunk and ce-default would never start its pool.
CASES: Final[dict[str, CaseSpec]] = {
    spec.id: spec
    for spec in (
        CaseSpec(
            id="W1",
            title="CE explain_factual, breast_cancer (30 features)",
            n_test=100,
            n_test_quick=12,
            n_cal=150,
        ),
        CaseSpec(
            id="W2",
            title="CE explain_factual, make_classification (100 features)",
            n_test=100,
            n_test_quick=12,
            n_cal=200,
            n_features=100,
            n_informative=20,
            n_redundant=10,
        ),
        CaseSpec(
            id="W3",
            title="CE explain_factual, make_classification (256 features)",
            n_test=50,
            n_test_quick=10,
            n_cal=200,
            n_features=256,
            n_informative=30,
            n_redundant=20,
        ),
    )
}


def _dataset(spec: CaseSpec) -> tuple[np.ndarray, np.ndarray]:
    if spec.n_features is None:
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        return np.asarray(data.data), np.asarray(data.target)
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=1500,
        n_features=spec.n_features,
        n_informative=spec.n_informative,
        n_redundant=spec.n_redundant,
        random_state=0,
    )
    return x, y


def build_case(wid: str, quick: bool, *, n_test: int | None = None) -> dict[str, Any]:
    """Fit the model of CE workload ``wid`` and split its data.

    Parameters
    ----------
    wid : str
        ``"W1"``, ``"W2"`` or ``"W3"``.
    quick : bool
        Explain the first ``n_test_quick`` test instances instead of all.
    n_test : int or None
        Explain only this many test instances (overrides ``quick``).

    Returns
    -------
    dict
        ``learner`` (fitted), ``x_cal``, ``y_cal``, ``x_test`` and sizes.

    Notes
    -----
    ``train_test_split(random_state=0, stratify=y)`` takes the test rows,
    then the calibration rows from the rest; the remainder trains the model.
    Quick runs explain a prefix of the same test rows with the same model.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    spec = CASES[wid]
    x, y = _dataset(spec)
    x_rest, x_test, y_rest, _ = train_test_split(
        x, y, test_size=spec.n_test, random_state=0, stratify=y
    )
    x_train, x_cal, y_train, y_cal = train_test_split(
        x_rest, y_rest, test_size=spec.n_cal, random_state=0, stratify=y_rest
    )
    learner = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    learner.fit(x_train, y_train)
    keep = n_test if n_test is not None else (spec.n_test_quick if quick else None)
    if keep is not None:
        x_test = x_test[:keep]
    return {
        "learner": learner,
        "x_cal": x_cal,
        "y_cal": y_cal,
        "x_test": np.ascontiguousarray(x_test),
        "n_train": len(x_train),
        "n_features": x.shape[1],
    }


def plugin_unavailable_reason() -> str | None:
    """Return why our CE plugin cannot be used here, or ``None``."""
    try:
        module = importlib.import_module(PLUGIN_MODULE)
    except ImportError as exc:
        return f"our CE plugin is not available: cannot import {PLUGIN_MODULE} ({exc})"
    missing = [name for name in ("enable", "disable") if not hasattr(module, name)]
    if missing:
        return f"our CE plugin is not available: {PLUGIN_MODULE} has no {', '.join(missing)}"
    return None


def unavailable_reason(name: str) -> str | None:
    """Return why CE workload configuration ``name`` cannot run, or ``None``."""
    if name not in CE_CONFIG_NAMES:
        return f"unknown CE configuration {name!r}; known: {', '.join(CE_CONFIG_NAMES)}"
    if not ce_installed():
        return "calibrated-explanations/scikit-learn not installed: pip install 'ce-parallel-engine[ce]'"
    if name in CE_CONFIGS:
        return None
    return plugin_unavailable_reason() or config_available(name)


def make_explainer(state: dict[str, Any], name: str) -> Any:
    """Return a calibrated ``WrapCalibratedExplainer`` set up for ``name``.

    Parameters
    ----------
    state : dict
        A :func:`build_case` result.
    name : str
        One of :data:`CE_CONFIG_NAMES`.

    Returns
    -------
    WrapCalibratedExplainer
        Close it with :func:`close_explainer`.

    Raises
    ------
    ValueError
        If ``name`` is unknown or cannot run here (the reason is given).
    """
    reason = unavailable_reason(name)
    if reason is not None:
        msg = f"CE configuration {name!r} cannot run: {reason}"
        raise ValueError(msg)
    from calibrated_explanations import ExplainerBuilder, WrapCalibratedExplainer

    learner, x_cal, y_cal = state["learner"], state["x_cal"], state["y_cal"]
    if name == "ce-default":
        # CE's documented switch: the builder's perf_parallel; the plugin must
        # also be selected, else the executor is never called.
        config = (
            ExplainerBuilder(learner)
            .perf_parallel(True, backend="processes", workers=CE_WORKERS)
            .build_config()
        )
        explainer = WrapCalibratedExplainer.from_config(config)
        explainer.calibrate(x_cal, y_cal, factual_plugin=CE_INSTANCE_PARALLEL)
        return explainer
    explainer = WrapCalibratedExplainer(learner)
    if name == "ce-tuned":
        # The builder has no chunk-size knob; CE's ParallelExecutor takes it.
        from calibrated_explanations.parallel import (
            ParallelConfig as CEParallelConfig,
        )
        from calibrated_explanations.parallel import (
            ParallelExecutor as CEParallelExecutor,
        )

        chunk = math.ceil(len(state["x_test"]) / CE_WORKERS)
        executor = CEParallelExecutor(
            CEParallelConfig(
                enabled=True,
                strategy="processes",
                max_workers=CE_WORKERS,
                instance_chunk_size=chunk,
            )
        )
        explainer.calibrate(
            x_cal, y_cal, perf_parallel=executor, factual_plugin=CE_INSTANCE_PARALLEL
        )
        return explainer
    explainer.calibrate(x_cal, y_cal)
    if name in OUR_CONFIGS:
        from engine.integrations.calibrated_explanations import enable

        enable(explainer, ParallelConfig(**STRATEGY_CONFIGS[name]))
    return explainer


def close_explainer(name: str, explainer: Any) -> None:
    """Shut down the pool behind ``explainer`` (ours or CE's)."""
    if name in OUR_CONFIGS:
        from engine.integrations.calibrated_explanations import disable

        disable(explainer)
        return
    # CalibratedExplainer.close() exits CE's ParallelExecutor, which calls
    # ProcessPoolExecutor.shutdown(wait=True): the workers are joined.
    inner = getattr(explainer, "explainer", None)
    if inner is not None:
        inner.close()
    executor = getattr(explainer, "parallel_executor", None)
    if executor is not None and hasattr(executor, "config"):
        executor.__exit__(None, None, None)


def _no_mapper(state: dict[str, Any], mapper: Any) -> None:
    msg = "CE workloads run by configuration name: call CEWorkload.run(name)"
    raise TypeError(msg)


@dataclass
class CEWorkload(Workload):
    """A W1-W3 workload: one warm calibrated explainer per configuration."""

    explainers: dict[str, Any] = field(default_factory=dict)

    def unavailable_reason(self, name: str) -> str | None:
        """Return why configuration ``name`` cannot run here, or ``None``."""
        return unavailable_reason(name)

    def skip_reason(self, name: str, *, quick: bool) -> str | None:
        """``--quick`` leaves out processes-spawn on W1-W3 (QUICK_SKIPS)."""
        if quick and name in QUICK_SKIPS:
            return QUICK_SKIPS[name]
        return self.unavailable_reason(name)

    def explainer(self, name: str) -> Any:
        """Return the (cached, warm) explainer of configuration ``name``."""
        found = self.explainers.get(name)
        if found is None:
            found = self.explainers[name] = make_explainer(self.state, name)
        return found

    def run(self, name: str) -> Any:
        """Explain the test instances once under ``name``; return the result.

        The explainer's ``latest_explanation`` is dropped afterwards: a user
        holds one explainer, the ablation one per configuration, and their
        last collections made the heap the caller's full GC passes walk
        1.7x larger (W2: 438k tracked objects instead of 251k). Those passes
        (0.2-0.6 s) then landed in our configurations' samples too; without
        the collections, only CE's own configurations, which allocate far
        more per call, still triggered them (4 rounds of all 8).
        """
        explainer = self.explainer(name)
        result = explainer.explain_factual(self.state["x_test"])
        inner = getattr(explainer, "explainer", explainer)
        if getattr(inner, "latest_explanation", None) is not None:
            inner.latest_explanation = None
        return result

    def executor(self, name: str) -> ParallelExecutor | None:
        """Our plugin's executor behind configuration ``name`` (ours only)."""
        explainer = self.explainers.get(name)
        if explainer is None or name not in OUR_CONFIGS:
            return None
        from engine.integrations.calibrated_explanations import executor_of

        return executor_of(explainer)

    def close(self) -> None:
        """Close every explainer's pool, then the base class's executors."""
        try:
            while self.explainers:
                name, explainer = self.explainers.popitem()
                close_explainer(name, explainer)
        finally:
            super().close()


def ce_workloads() -> list[Workload]:
    """W1-W3, baseline ``ce-sequential``, for ``python -m engine ablate``."""

    def builder(wid: str) -> Any:
        return lambda quick: build_case(wid, quick)

    return [
        CEWorkload(
            spec.id, spec.title, CE_CONFIG_NAMES, BASELINE, builder(spec.id), _no_mapper
        )
        for spec in CASES.values()
    ]


def _close(a: Any, b: Any, atol: float) -> bool:
    """Equal structure, equal strings, numbers within ``atol``."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        return (
            isinstance(a, Mapping)
            and isinstance(b, Mapping)
            and a.keys() == b.keys()
            and all(_close(a[key], b[key], atol) for key in a)
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        left, right = np.asarray(a), np.asarray(b)
        if left.shape != right.shape:
            return False
        if left.dtype.kind in "biuf" and right.dtype.kind in "biuf":
            return bool(np.allclose(left, right, rtol=0.0, atol=atol, equal_nan=True))
        return _close(left.tolist(), right.tolist(), atol)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (
            isinstance(a, (list, tuple))
            and isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_close(x, y, atol) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= atol
    return bool(a == b)


def explanation_differences(
    reference: Any, candidate: Any, *, atol: float = IDENTITY_ATOL
) -> dict[str, int]:
    """Count the instances whose explanations differ, field by field.

    Parameters
    ----------
    reference, candidate : CalibratedExplanations
        Two results of ``explain_factual`` on the same instances.
    atol : float
        Absolute tolerance for numbers.

    Returns
    -------
    dict
        ``{field: instances that differ}`` for every compared field that
        differs anywhere: ``count``, ``feature_weights.<key>``,
        ``feature_predict.<key>``, ``prediction.<key>`` and ``rules.<key>``
        (the keys of ``get_rules()``). Empty when identical.
    """
    left, right = list(reference.explanations), list(candidate.explanations)
    found: dict[str, int] = {}
    if len(left) != len(right):
        found["count"] = abs(len(left) - len(right))
    for a, b in zip(left, right, strict=False):
        parts = [
            (part, getattr(a, part), getattr(b, part))
            for part in ("feature_weights", "feature_predict", "prediction")
        ]
        parts.append(("rules", a.get_rules(), b.get_rules()))
        for part, mine, theirs in parts:
            for key in sorted(set(mine) | set(theirs)):
                same = key in mine and key in theirs
                if not (same and _close(mine[key], theirs[key], atol)):
                    name = f"{part}.{key}"
                    found[name] = found.get(name, 0) + 1
    return found


def is_identical(
    differences: Mapping[str, int], *, ignore: tuple[str, ...] = ()
) -> bool:
    """Return True when ``differences`` is empty apart from ``ignore``d fields."""
    return not any(count for key, count in differences.items() if key not in ignore)
