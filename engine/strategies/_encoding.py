"""The processes strategy's map-thread encoding: chunks out, results back in order.

The map thread pickles ``(fn, extra_args)`` once per map and every non-plain
chunk through the executor's ``PayloadStore``. When that fails, these
helpers pickle the parts one by one to name the culprit (FAULTS.md #4, #5):
the function or argument, or the item, with a remedy. ``decode_ready``
turns the workers' RESULT / RESULT_PACK payloads (``engine._wire``) back
into each chunk's results, in input order. ``decode_outcome`` does the same
for one chunk run by a joblib (loky) or dask worker.
"""

from __future__ import annotations

import pickle
import reprlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from engine._wire import (
    RESULT_META,
    WHOLE_LIST,
    decode_results,
    split_pack,
    unpack_error,
)
from engine.errors import PayloadError

if TYPE_CHECKING:
    from engine._chunks import Chunk
    from engine.payload import PayloadStore
    from engine.strategies._runs import MapCounts
    from engine.strategies.base import RunContext

_META: Final = RESULT_META
_WHOLE_LIST: Final = WHOLE_LIST


def unpicklable_error(
    store: PayloadStore,
    fn: Callable[..., Any],
    extra_args: tuple[Any, ...],
    exc: Exception,
) -> pickle.PicklingError:
    """Return the error naming which of ``fn`` and ``extra_args`` cannot pickle."""
    what = "fn or one of its arguments"
    for label, value in [
        ("fn", fn),
        *((f"extra argument {i}", a) for i, a in enumerate(extra_args)),
    ]:
        try:
            store.dumps(value)
        except Exception:  # this is the one
            what = f"{label}={describe(value)}"
            break
    msg = (
        f"{what} cannot be pickled to send it to the worker processes: {exc}. "
        "Define functions at module level, and pass only picklable arguments "
        "(locks, open files, sockets and generators cannot travel); or use "
        "strategy='threads', which needs no pickling. Nothing was dispatched."
    )
    return pickle.PicklingError(msg)


def dump_items(
    store: PayloadStore, chunk: Chunk, used: set[str] | None = None
) -> bytes:
    """Pickle a non-plain chunk with ``store``; name the item that cannot pickle.

    ``used``: the run's lease set, for arrays shared for the run only.
    """
    items = chunk.items
    try:
        data = store.dumps(items, used=used)
    except PayloadError:
        raise
    except Exception:
        for offset, item in enumerate(items):
            try:
                store.dumps(item)
            except Exception as item_exc:
                msg = (
                    f"item {chunk.start + offset} ({describe(item)}) cannot be "
                    f"pickled to send it to the worker processes: {item_exc}. Pass "
                    "picklable items, or use strategy='threads'."
                )
                raise pickle.PicklingError(msg) from item_exc
        raise
    return data


def describe(value: Any) -> str:
    """Name a value in an error: functions by qualified name, others by repr."""
    name = getattr(value, "__qualname__", None)
    if callable(value) and isinstance(name, str):
        return f"{getattr(value, '__module__', '?')}.{name}"
    return f"{reprlib.repr(value)} ({type(value).__qualname__})"


def decode_ready(
    done: dict[int, Any],
    pending: dict[int, Chunk],
    next_index: int,
    counts: MapCounts,
) -> tuple[list[tuple[Chunk, list[Any]]], int]:
    """Decode the finished chunks from ``next_index`` on, in input order.

    Pops them from ``done`` and ``pending``, adds their telemetry to
    ``counts`` and returns ``(ready, next_index)``: one clock pair per batch
    in the caller, not per chunk (W4's tiny chunks).
    """
    ready: list[tuple[Chunk, list[Any]]] = []
    n_items = nbytes = 0
    compute_s = wait_s = 0.0
    while next_index in done:
        outcome = done.pop(next_index)
        if type(outcome) is list:  # re-run serially
            ready.append((pending.pop(next_index), outcome))
            next_index += 1
            continue
        wait_s += outcome.dispatch_wait_s
        count = outcome.count
        parts = (outcome.payload,) if count == 1 else split_pack(outcome.payload, count)
        nbytes += len(outcome.payload)
        for payload in parts:
            chunk = pending.pop(next_index)
            next_index += 1
            if type(payload) is tuple:  # a plain pack: decoded
                chunk_s, worker_wait_s, results = payload
            else:
                chunk_s, worker_wait_s, kind = _META.unpack_from(payload)
                if kind == _WHOLE_LIST:  # plain results: one pickle
                    results = pickle.loads(payload[_META.size :])
                else:
                    results = decode_results(payload, chunk.start)[0]
            ready.append((chunk, results))
            n_items += len(results)
            compute_s += chunk_s
            wait_s += worker_wait_s
    counts.chunks += len(ready)
    counts.items += n_items
    counts.bytes_pickled += nbytes
    counts.compute_s += compute_s
    counts.queue_wait_s += wait_s
    return ready, next_index


def decode_outcome(
    chunk: Chunk, outcome: tuple[bool, bytes], ctx: RunContext
) -> list[Any]:
    """Return the results of one chunk a worker ran, counted in telemetry.

    ``outcome`` is the worker's ``(ok, data)``; a failed chunk re-raises the
    remote exception with its own type (``engine._wire.unpack_error``).
    """
    ok, data = outcome
    if not ok:
        raise unpack_error(data)
    results, compute_s, wait_s = decode_results(data, chunk.start)
    ctx.recorder.add(
        chunks=1,
        items=len(chunk),
        compute_s=compute_s,
        queue_wait_s=wait_s,
        bytes_pickled=len(data),
    )
    return results


def dumps_naming(
    dumps: Callable[[Any], bytes],
    value: Any,
    parts: Iterable[tuple[str, Any]],
    *,
    workers: str,
) -> bytes:
    """``dumps(value)``, or a ``PicklingError`` naming the first part that fails.

    ``workers`` names where the task was going ("the joblib workers").
    """
    try:
        return dumps(value)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        culprit = "a part of the task"
        for label, part in parts:
            try:
                dumps(part)
            except Exception:
                culprit = label
                break
        msg = (
            f"{culprit} cannot be pickled to send it to {workers} ({exc}). "
            "Define functions at module level and pass picklable arguments and "
            "items (locks, open files and generators cannot travel), or create "
            "the object inside fn. Nothing of it was sent."
        )
        raise pickle.PicklingError(msg) from exc


def call_parts(
    fn: Callable[..., Any], extra_args: tuple[Any, ...]
) -> Iterator[tuple[str, Any]]:
    """The labelled parts of ``(fn, extra_args)``, for ``dumps_naming``."""
    yield "fn", fn
    for index, arg in enumerate(extra_args):
        yield f"extra argument #{index} ({type(arg).__name__})", arg


def item_parts(chunk: Chunk) -> Iterator[tuple[str, Any]]:
    """The labelled items of ``chunk``, for ``dumps_naming``."""
    for offset, item in enumerate(chunk.items):
        yield f"item {chunk.start + offset} ({type(item).__name__})", item
