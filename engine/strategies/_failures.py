"""What the processes strategy's map thread makes of a chunk that failed.

A chunk's outcome other than RESULT (``engine.strategies._runs.OutcomeKind``)
becomes an exception for the caller: the error of ``fn`` with its own type,
``WorkerCrashedError`` for a worker that died, the pool's own failure, or
``CancelledError``. With ``force_serial_on_failure`` a crashed chunk is run
again here, in the caller, instead (FAULTS.md #1), with a
``FallbackWarning``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine._chunks import Chunk, run_chunk
from engine._wire import unpack_error
from engine.errors import (
    BrokenExecutorError,
    CancelledError,
    FallbackWarning,
    WorkerCrashedError,
)
from engine.strategies._runs import MapCounts, Outcome, OutcomeKind

if TYPE_CHECKING:
    from engine.payload import PayloadStore
    from engine.strategies.base import RunContext


def settle(
    chunk: Chunk | None,
    outcome: Outcome,
    fn: Callable[..., Any],
    extra_args: tuple[Any, ...],
    ctx: RunContext,
    counts: MapCounts,
    *,
    store: PayloadStore,
    force_serial: bool,
) -> list[Any]:
    """Turn a chunk's failure outcome into re-run results, or raise."""
    kind = outcome.kind
    recorder = ctx.recorder
    if kind is OutcomeKind.ERROR:
        recorder.add(failures=1)
        raise unpack_error(outcome.payload)
    if kind is OutcomeKind.CRASHED and chunk is not None:
        recorder.add(failures=1)
        how = _describe_exit(outcome)
        where = (
            f"chunk {chunk.index} (items {chunk.start}..{chunk.start + len(chunk) - 1})"
        )
        if force_serial:
            results = _rerun_serially(
                chunk, outcome, how, where, fn, extra_args, ctx, store
            )
            counts.total_chunks += 1
            return results
        msg = (
            f"worker process {outcome.pid} died ({how}) while running {where}; "
            "the pool replaced it and stays usable. Set "
            "ParallelConfig(force_serial_on_failure=True) (CE_PARALLEL token "
            "force_serial=on) to re-run lost chunks serially instead."
        )
        raise WorkerCrashedError(
            msg,
            pid=outcome.pid,
            exitcode=outcome.exitcode,
            signal_name=outcome.signal_name,
            chunk_index=chunk.index,
        )
    if kind is OutcomeKind.FAILED:
        error_type = outcome.error_type or BrokenExecutorError
        raise error_type(outcome.reason)
    ctx.check()  # CANCELLED: only a cancelled run gets these
    msg = f"chunk {getattr(chunk, 'index', '?')} was cancelled"
    raise CancelledError(msg)


def _describe_exit(outcome: Outcome) -> str:
    if outcome.signal_name is not None:
        return f"killed by {outcome.signal_name}"
    if outcome.exitcode is not None:
        return f"exit code {outcome.exitcode}"
    return "exit status unknown"


# FAULTS.md #1 with force_serial_on_failure: the lost chunk runs here, in
# the caller, with the original fn and locally resolved payloads.
def _rerun_serially(
    chunk: Chunk,
    outcome: Outcome,
    how: str,
    where: str,
    fn: Callable[..., Any],
    extra_args: tuple[Any, ...],
    ctx: RunContext,
    store: PayloadStore,
) -> list[Any]:
    reason = (
        f"worker process {outcome.pid} died ({how}) while running {where}; "
        "re-ran it serially in the caller (force_serial_on_failure=True)"
    )
    warnings.warn(reason, FallbackWarning, stacklevel=_user_stacklevel())
    ctx.recorder.record_fallback(
        reason,
        chunk=chunk.index,
        pid=outcome.pid,
        exitcode=outcome.exitcode,
        signal=outcome.signal_name,
    )
    local_args = store.resolve_local(tuple(extra_args))
    results, compute_s = run_chunk(
        fn, chunk.items, local_args, is_cancelled=ctx.is_cancelled, as_worker=False
    )
    ctx.recorder.add(chunks=1, items=len(results), compute_s=compute_s)
    return results


def _user_stacklevel() -> int:
    """Stack level of the first frame outside the engine (for warnings)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        "engine"
    ):
        frame = frame.f_back
        level += 1
    return level
