"""Factual explanations of calibrated-explanations (CE) 1.0.x on the kernels.

The computation behind the CE plugin, split for parallel use:

- :func:`is_supported` -- may the kernels handle this request?
- :func:`prepare` -- caller side: whole-batch predictions and tables,
  returns a :class:`FactualPlan` whose ``model`` (:class:`ModelState`) and
  ``batch`` (:class:`BatchState`) are what workers need;
- :func:`explain_chunk` -- worker side, pure: ``explain_chunk(rows, model,
  batch)``, fit for ``ParallelExecutor.map(explain_chunk, chunks, model,
  batch)``;
- :func:`assemble` -- caller side: CE's own ``CalibratedExplanations``; or
  :class:`FactualAssembler` to build it chunk by chunk while workers run;
- :func:`explain_factual_serial` -- all of it in one call, for tests.

The plugin: ``enable(explainer, config)`` selects :data:`PLUGIN_ID` on a
calibrated explainer and starts a warm executor, after which CE's own
``explain_factual`` runs on the engine; ``disable(explainer)`` undoes it.

CE is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

from ._assemble import FactualAssembler, assemble
from ._ce_state import (
    ModelState,
    UnsupportedCaseError,
    is_supported,
    request_fields,
)
from ._factual import BatchState, FactualPlan, explain_chunk, prepare
from ._plugin import (
    PLUGIN_ID,
    PLUGIN_META,
    EngineFactualPlugin,
    disable,
    enable,
    executor_of,
    is_enabled,
)
from ._serial import explain_factual_serial

__all__ = [
    "PLUGIN_ID",
    "PLUGIN_META",
    "BatchState",
    "EngineFactualPlugin",
    "FactualAssembler",
    "FactualPlan",
    "ModelState",
    "UnsupportedCaseError",
    "assemble",
    "disable",
    "enable",
    "executor_of",
    "explain_chunk",
    "explain_factual_serial",
    "is_enabled",
    "is_supported",
    "prepare",
    "request_fields",
]
