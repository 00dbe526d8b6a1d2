"""The calibrated-explanations plugin: ``enable(explainer)`` and its executor.

::

    explainer.explain_factual(x)                      (CE's own entry point)
      └─ CE plugin chain ─▶ EngineFactualPlugin.explain_batch(x, request)
           ├─ predict bridge (CE's contract for non-core plugins)
           ├─ unsupported case? ─▶ CE's own sequential path + FallbackWarning
           ├─ prepare(): whole-batch predictions and kernel tables (caller)
           ├─ executor.imap(explain_chunk, row chunks, model, batch)
           │     model: shared once per executor (pickled once, unpickled
           │     once per worker); batch: per call, big arrays in shared memory
           └─ FactualAssembler: CE's own objects, built as chunks arrive

CE builds a fresh plugin object (``type(obj)()``) for each explainer, so the
executor cannot travel inside the plugin: ``enable`` records a binding
(explainer -> executor) that the plugin finds through the explainer handle CE
passes it. CE is imported lazily, inside the functions.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Final, final

import numpy as np

import kernels
from engine.config import ParallelConfig
from engine.errors import ConfigError, FallbackWarning
from engine.executor import ParallelExecutor

from ._assemble import FactualAssembler
from ._ce_state import ModelState, UnsupportedCaseError, is_supported, request_fields
from ._factual import explain_chunk, prepare
from ._rules import gc_paused
from ._serial import unwrap_explainer

__all__ = [
    "PLUGIN_ID",
    "PLUGIN_META",
    "EngineFactualPlugin",
    "disable",
    "enable",
    "is_enabled",
]

PLUGIN_ID: Final = "engine.factual"
CE_SEQUENTIAL_ID: Final = "core.explanation.factual.sequential"

PLUGIN_META: Final[dict[str, Any]] = {
    "schema_version": 1,
    "name": PLUGIN_ID,
    "version": "0.1.0",
    "provider": "ce-parallel-engine",
    "modes": ("factual",),
    "tasks": ("classification", "regression"),
    "data_modalities": ("tabular",),
    "dependencies": (),
    "trusted": True,
    "trust": {"trusted": True},
    "capabilities": (
        "explain",
        "explanation:factual",
        "task:classification",
        "task:regression",
    ),
    "fallbacks": (CE_SEQUENTIAL_ID,),
}

# Row chunks per worker, between these bounds: enough that the caller builds
# CE's objects for early chunks while workers compute later ones, few enough
# that each chunk's one model call amortises the model's per-call cost (a
# 100-tree random forest: ~13 ms a call, whatever the rows). Each chunk aims
# at PERTURBED_ROWS_PER_CHUNK perturbed rows. Alternating settings call by
# call on one warm explainer (15 calls each, processes-fork): W1 (9,000 perturbed rows)
# took 208 ms with 2 chunks per worker, 247 ms with 4; W3 (38,000) 590 ms
# with 4, 621 ms with 2; W2 (30,000) 378-404 ms either way.
MIN_CHUNKS_PER_WORKER: Final = 2
MAX_CHUNKS_PER_WORKER: Final = 4
PERTURBED_ROWS_PER_CHUNK: Final = 5_000
MIN_ROWS_PER_CHUNK: Final = 4


@dataclass
class _Binding:
    """What ``enable`` set up for one calibrated explainer."""

    explainer: weakref.ref
    executor: ParallelExecutor
    min_instances: int = 1  # the user's min_batch_size, counted in instances
    model: ModelState | None = None
    model_ref: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def model_argument(self, model: ModelState) -> Any:
        """Share ``model`` once per executor; reuse it while it is the same."""
        with self.lock:
            if self.model is not model:
                self.model = model
                self.model_ref = self.executor.share(model)
            return self.model_ref


_bindings: dict[int, _Binding] = {}
_bindings_lock = threading.Lock()
_registered = False


def _register() -> None:
    """Register and trust the plugin with CE's registry (once per process)."""
    global _registered
    with _bindings_lock:
        if _registered:
            return
        import calibrated_explanations.plugins as ce_plugins

        if ce_plugins.find_explanation_descriptor(PLUGIN_ID) is None:
            ce_plugins.register_explanation_plugin(PLUGIN_ID, EngineFactualPlugin())
        ce_plugins.mark_explanation_trusted(PLUGIN_ID)
        _registered = True


def _select(ce: Any, plugin_id: str | None) -> None:
    """Make CE's plugin manager use ``plugin_id`` (None: CE's default)."""
    manager = ce.plugin_manager
    manager.explanation_plugin_overrides["factual"] = plugin_id
    manager.clear_explanation_plugin_instances()
    manager.clear_explanation_plugin_identifiers()
    manager.initialize_chains()


def _calibrated(explainer: Any) -> Any:
    ce = unwrap_explainer(explainer)
    if not hasattr(ce, "prediction_orchestrator") or not hasattr(ce, "plugin_manager"):
        msg = (
            f"enable() needs a calibrated explainer; got {type(explainer).__name__}. "
            "Call fit() and calibrate() first (WrapCalibratedExplainer), or pass a "
            "CalibratedExplainer."
        )
        raise ConfigError(msg)
    return ce


def _close(key: int) -> None:
    with _bindings_lock:
        binding = _bindings.pop(key, None)
    if binding is not None:
        binding.executor.shutdown()


def enable(explainer: Any, config: ParallelConfig | None = None) -> Any:
    """Make ``explainer.explain_factual`` run on the engine.

    Parameters
    ----------
    explainer : WrapCalibratedExplainer or CalibratedExplainer
        Fitted and calibrated. A later ``calibrate()`` builds a new CE
        explainer and drops the selection: call ``enable`` again.
    config : ParallelConfig or None
        The executor's configuration; ``None`` means
        ``ParallelConfig.from_env()`` (``CE_PARALLEL``).

    Returns
    -------
    explainer
        The same object, for chaining.

    Notes
    -----
    The executor starts now and stays warm across ``explain_factual`` calls;
    it is closed by ``disable``, when the explainer is garbage-collected, or
    at interpreter exit.
    """
    ce = _calibrated(explainer)
    _register()
    config = config if config is not None else ParallelConfig.from_env()
    # The plugin gates on instances with the user's min_batch_size, as CE
    # does; its executor then runs every list of row chunks (5 chunks of 20
    # instances were gated to serial by the executor's own item count).
    executor = ParallelExecutor(config.replace(min_batch_size=1))
    executor.__enter__()
    key = id(ce)
    _close(key)  # enabling twice replaces the first executor
    binding = _Binding(
        explainer=weakref.ref(ce),
        executor=executor,
        min_instances=config.min_batch_size,
    )
    with _bindings_lock:
        _bindings[key] = binding
    weakref.finalize(ce, _close, key)
    try:
        _select(ce, PLUGIN_ID)
    except BaseException:
        _close(key)
        raise
    return explainer


def disable(explainer: Any) -> Any:
    """Restore CE's default factual path and close the engine's executor."""
    ce = _calibrated(explainer)
    _close(id(ce))
    _select(ce, None)
    return explainer


def is_enabled(explainer: Any) -> bool:
    """Return True if ``enable`` is in force for ``explainer``."""
    return _binding_of(unwrap_explainer(explainer)) is not None


def executor_of(explainer: Any) -> ParallelExecutor | None:
    """Return the executor ``enable`` started for ``explainer`` (telemetry)."""
    binding = _binding_of(unwrap_explainer(explainer))
    return None if binding is None else binding.executor


def _binding_of(ce: Any) -> _Binding | None:
    with _bindings_lock:
        binding = _bindings.get(id(ce))
    if binding is None or binding.explainer() is not ce:
        return None
    return binding


def _binding_for_handle(handle: Any) -> tuple[Any, _Binding] | tuple[None, None]:
    """Find the explainer behind CE's handle among the enabled ones."""
    orchestrator = getattr(handle, "prediction_orchestrator", None)
    with _bindings_lock:
        bindings = list(_bindings.values())
    for binding in bindings:
        ce = binding.explainer()
        if ce is not None and ce.prediction_orchestrator is orchestrator:
            return ce, binding
    return None, None


def _perturbed_rows(batch: Any) -> int:
    """How many perturbed rows the batch's chunks will score, about."""
    categorical = batch.n_cat_values[batch.feature_kind == kernels.CATEGORICAL]
    return int(
        batch.n_values[:, :, :2].sum()
        + batch.n_covered.sum()
        + batch.x.shape[0] * categorical.sum()
    )


def _row_chunks(
    n_rows: int, config: ParallelConfig, workers: int, perturbed_rows: int
) -> list[np.ndarray]:
    workers = max(1, workers)
    per_worker = min(
        MAX_CHUNKS_PER_WORKER,
        max(
            MIN_CHUNKS_PER_WORKER,
            perturbed_rows // (workers * PERTURBED_ROWS_PER_CHUNK),
        ),
    )
    size = config.instance_chunk_size or max(
        MIN_ROWS_PER_CHUNK, math.ceil(n_rows / (workers * per_worker))
    )
    return [
        np.arange(start, min(n_rows, start + size)) for start in range(0, n_rows, size)
    ]


@final
class EngineFactualPlugin:
    """CE factual explanation plugin computing with the engine's kernels.

    CE instantiates it with no arguments and calls ``initialize`` then
    ``explain_batch``; the executor comes from ``enable``.
    """

    plugin_meta: Final = PLUGIN_META

    def __init__(self) -> None:
        self._context: Any = None

    def supports_mode(self, mode: str, *, task: str) -> bool:
        """Return True for factual explanations."""
        return mode == "factual"

    def initialize(self, context: Any) -> None:
        """Keep CE's context (handles, predict bridge)."""
        self._context = context

    def explain_batch(self, x: Any, request: Any) -> Any:
        """Explain ``x`` as CE's sequential plugin would, on the engine."""
        from calibrated_explanations.plugins.builtins import collection_to_batch

        context = self._context
        if context is None:
            msg = "the plugin was not initialised; CE calls initialize() first"
            raise RuntimeError(msg)
        handle = context.helper_handles["explainer"]
        ce, binding = _binding_for_handle(handle)
        if binding is None:
            return self._fallback(
                x, request, None, "enable() was not called for this explainer"
            )
        supported, reason = is_supported(ce, x, request)
        if not supported:
            return self._fallback(x, request, binding, reason)
        try:
            plan = prepare(ce, x, **request_fields(request), model=binding.model)
        except UnsupportedCaseError as exc:
            return self._fallback(x, request, binding, exc.reason)
        executor = binding.executor
        model = binding.model_argument(plan.model)
        n_rows = plan.batch.x.shape[0]
        workers = executor.config.max_workers or _usable_cpus()
        chunks = _row_chunks(
            n_rows, executor.config, workers, _perturbed_rows(plan.batch)
        )
        if n_rows < binding.min_instances:
            # Gating counts instances, as calibrated-explanations does; the
            # kernels still run, in the caller.
            results = iter([explain_chunk(np.arange(n_rows), plan.model, plan.batch)])
        else:
            results = executor.imap(
                explain_chunk, chunks, model, plan.batch, chunk_size=1
            )
        # Processes start on imap (STARTS_EAGERLY): this caller-side work
        # (a model call and CE's deep copy of the explainer) overlaps them.
        # The collector stays paused while results arrive too: a generation-2
        # pass over CE's objects stalled the caller for ~200 ms on W3.
        with gc_paused():
            with plan.scores.installed(ce, bridge=True):
                self._use_bridge(plan.scores.first_row, request)
            # CE's orchestrator rebuilds the collection with from_batch,
            # which takes the explainer's snapshot: ours is only a template.
            assembler = FactualAssembler(plan, defer_snapshot=True)
            for result in results:
                assembler.add(result)
            return collection_to_batch(assembler.finish())

    def _use_bridge(self, x: Any, request: Any) -> None:
        """Call CE's calibrated predict bridge, as CE requires of plugins.

        CE fails a non-core plugin that never calls the bridge. The numbers
        come from CE's calibrated predictor (``predict_internal``, as CE's own
        factual plugins use it), so one instance satisfies the rule: a whole
        batch cost two more model calls on the critical path (25-30 ms on W1).
        On the kernel path the instance is the batch's first row, whose model
        scores the plan's ``ScoreMemo`` already holds.
        """
        context = self._context
        bins = request.bins
        context.predict_bridge.predict_interval(
            np.atleast_2d(np.asarray(getattr(x, "values", x)))[:1],
            task=context.task,
            bins=None if bins is None else np.asarray(bins)[:1],
        )

    def _fallback(
        self, x: Any, request: Any, binding: _Binding | None, reason: str
    ) -> Any:
        """Run CE's own sequential path, saying why (never a wrong answer)."""
        from calibrated_explanations.plugins.registry import find_explanation_descriptor

        message = (
            f"calibrated-explanations request not covered by the engine ({reason}); "
            "ran CE's own sequential path"
        )
        warnings.warn(message, FallbackWarning, stacklevel=3)
        self._use_bridge(x, request)
        if binding is not None:
            binding.executor.telemetry.note_fallback(
                message, integration="calibrated_explanations"
            )
        # CE's own default plugin, built and initialised as CE itself does.
        descriptor = find_explanation_descriptor(CE_SEQUENTIAL_ID)
        if descriptor is None:
            msg = f"calibrated-explanations has no {CE_SEQUENTIAL_ID!r} plugin to fall back to"
            raise RuntimeError(msg)
        plugin = type(descriptor.plugin)()
        plugin.initialize(self._context)
        return plugin.explain_batch(x, request)


def _usable_cpus() -> int:
    from engine._context import usable_cpu_count

    return usable_cpu_count()
