"""The worker side of shared-memory payloads: attach handles, once per process.

``engine.payload`` re-exports these; ``PayloadStore.dumps`` pickles each
handle as a call to :func:`attach`, so unpickling in any process attaches it
(zero-copy view for arrays, one unpickle per process for objects).
"""

from __future__ import annotations

import ast
import os
import pickle
import threading
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, final

import numpy as np

from engine import _shm
from engine.errors import PayloadError
from engine.forksafe import register_fork_reset

__all__ = [
    "PayloadRef",
    "attach",
    "detach",
    "detach_all",
    "detach_transient",
    "loads",
    "readonly_view",
    "resolve",
]


@final
@dataclass(frozen=True, slots=True)
class PayloadRef:
    """A small picklable handle to one shared array or object.

    Attributes
    ----------
    key : str
        Unique per shared object; the per-process attach cache key.
    name : str
        Segment name, ``cepe_<pid base36>_<random>`` (at most 30 chars).
    kind : str
        ``"array"`` (zero-copy view) or ``"object"`` (pickled bytes).
    nbytes : int
        Bytes of payload in the segment (the segment may be larger).
    shape : tuple of int
        Array shape; ``()`` for objects.
    dtype : str
        Array dtype as ``dtype.str``, or ``repr`` of its descr when
        structured; ``""`` for objects.
    order : str
        ``"C"`` or ``"F"``: memory layout of the array in the segment.
    offset : int
        Byte offset of the payload in the segment.
    transient : bool
        Shared for one run (``dumps(..., used=...)``): workers drop their
        attachment when the run is released, the owner unlinks the segment
        when no run uses it and the original array is gone.
    """

    key: str
    name: str
    kind: str
    nbytes: int
    shape: tuple[int, ...] = ()
    dtype: str = ""
    order: str = "C"
    offset: int = 0
    transient: bool = False


def readonly_view(obj: Any) -> Any:
    """Return a read-only view of an array, or ``obj`` itself otherwise.

    Parameters
    ----------
    obj : object
        Any value; only ``numpy.ndarray`` instances are wrapped.
    """
    if isinstance(obj, np.ndarray):
        view = obj.view()
        view.flags.writeable = False
        return view
    return obj


def _dtype_from_str(text: str) -> np.dtype:
    if text.startswith("["):
        return np.lib.format.descr_to_dtype(ast.literal_eval(text))
    return np.dtype(text)


# key -> (value, segment or None). Filled by attach(), emptied by detach_all()
# and in forked children (the values may hold locks or threads of the parent).
_attached: dict[str, tuple[Any, shared_memory.SharedMemory | None]] = {}
# Keys of transient handles attached here (detach_transient drops them).
_transient: set[str] = set()
_attach_lock = threading.RLock()
_hooks_installed = False


def _reset_process_state() -> None:
    """Fork reset of this module: fresh locks, empty cache, real tracker hook."""
    global _attached, _attach_lock, _transient
    _shm.reset_tracker_after_fork()
    _attach_lock = threading.RLock()
    # Dropped, not closed: the child's own views may still use the mappings.
    _attached = {}
    _transient = set()


def _install_hooks() -> None:
    global _hooks_installed
    if not _hooks_installed:
        _hooks_installed = True
        register_fork_reset(_reset_process_state)


def _gone(ref: PayloadRef, exc: BaseException) -> PayloadError:
    msg = (
        f"shared-memory segment {ref.name!r} ({ref.kind}, {ref.nbytes} bytes) cannot "
        f"be attached: {exc}. Its PayloadStore was closed or its process died; keep "
        "the executor open (inside its with-block) while tasks use its payloads."
    )
    return PayloadError(msg)


def _attach_new(ref: PayloadRef) -> tuple[Any, shared_memory.SharedMemory | None]:
    try:
        segment = _shm.open_attached(ref.name)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise _gone(ref, exc) from exc
    try:
        if segment.size < ref.offset + ref.nbytes:
            msg = (
                f"shared-memory segment {ref.name!r} holds {segment.size} bytes, "
                f"fewer than the {ref.offset + ref.nbytes} its handle describes; "
                "the handle does not belong to this segment."
            )
            raise PayloadError(msg)
        if ref.kind == "object":
            start = ref.offset
            try:
                with segment.buf[start : start + ref.nbytes] as data:
                    value = pickle.loads(data)
            except Exception as exc:
                msg = (
                    f"the object shared in segment {ref.name!r} cannot be unpickled "
                    f"in process {os.getpid()}: {exc!r}. Its class must be importable "
                    "in workers: define it in an installed module or the script."
                )
                raise PayloadError(msg) from exc
            _shm.close_quietly(segment)  # the object is a copy; no handle needed
            return readonly_view(value), None
        dtype = _dtype_from_str(ref.dtype)
        if ref.nbytes == 0:
            # Empty (or zero-itemsize) arrays hold no bytes: nothing to map.
            _shm.close_quietly(segment)
            empty = np.ndarray(ref.shape, dtype, buffer=b"", order=ref.order)  # type: ignore[call-overload]
            return empty, None
        # frombuffer over a read-only memoryview keeps the memoryview as the
        # base, so the WRITEABLE flag cannot be turned back on (np.ndarray
        # (buffer=...) would expose the writable mmap underneath): one task
        # cannot corrupt another's input.
        count = ref.nbytes // dtype.itemsize
        flat = np.frombuffer(
            segment.buf.toreadonly(), dtype=dtype, count=count, offset=ref.offset
        )
        view = flat.reshape(ref.shape, order=ref.order)  # type: ignore[call-overload]
        return view, segment
    except BaseException:
        _shm.close_quietly(segment)
        raise


def attach(ref: PayloadRef) -> Any:
    """Return the value behind ``ref``, attached once per process.

    Parameters
    ----------
    ref : PayloadRef
        A handle from ``PayloadStore.share`` or ``dumps``.

    Returns
    -------
    object
        For an array, a zero-copy read-only view into the segment
        (``flags.writeable`` is False); for an object, its unpickled value,
        the same object on every call in this process.

    Raises
    ------
    PayloadError
        The segment is gone (the owner closed it or died), naming it.

    Notes
    -----
    Attaching never registers with the resource tracker and never unlinks
    (gh-82300), so a worker's exit or SIGKILL leaves the segment to its owner.
    """
    cached = _attached.get(ref.key)
    if cached is not None:
        return cached[0]
    with _attach_lock:
        _install_hooks()
        cached = _attached.get(ref.key)
        if cached is None:
            cached = _attached[ref.key] = _attach_new(ref)
            if ref.transient:
                _transient.add(ref.key)
        return cached[0]


def resolve(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Replace top-level ``PayloadRef`` elements of ``args`` by ``attach``."""
    return tuple(attach(a) if isinstance(a, PayloadRef) else a for a in args)


def loads(data: bytes) -> Any:
    """Unpickle what ``PayloadStore.dumps`` made, attaching its handles.

    Parameters
    ----------
    data : bytes
        Output of ``PayloadStore.dumps`` (or any pickle).
    """
    return pickle.loads(data)


def detach(ref: PayloadRef) -> None:
    """Drop this process's cached attachment of ``ref`` (never unlinks).

    Notes
    -----
    The mapping is closed now if no view of it is alive, else when the last
    view is collected.
    """
    with _attach_lock:
        cached = _attached.pop(ref.key, None)
    if cached is not None and cached[1] is not None:
        _shm.close_quietly(cached[1])


def detach_transient() -> None:
    """Drop this process's attachments of transient handles (never unlinks).

    Workers call it when no run they hold is left: the owner unlinks those
    segments once their runs end, and a mapping kept here would keep the
    memory. A later run attaches again (about 0.1 ms a segment).
    """
    global _transient
    with _attach_lock:
        keys, _transient = _transient, set()
        dropped = [_attached.pop(key, None) for key in keys]
    for cached in dropped:
        if cached is not None and cached[1] is not None:
            _shm.close_quietly(cached[1])


def detach_all() -> None:
    """Drop every cached attachment of this process (never unlinks).

    Notes
    -----
    Workers call it at exit. Mappings still used by live views are closed
    when those views are collected.
    """
    global _attached, _transient
    with _attach_lock:
        attached, _attached = _attached, {}
        _transient = set()
    for _, segment in attached.values():
        if segment is not None:
            _shm.close_quietly(segment)
