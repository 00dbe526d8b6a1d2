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
from ._serial import explain_factual_serial

__all__ = [
    "BatchState",
    "FactualAssembler",
    "FactualPlan",
    "ModelState",
    "UnsupportedCaseError",
    "assemble",
    "explain_chunk",
    "explain_factual_serial",
    "is_supported",
    "prepare",
    "request_fields",
]
