"""Shared-memory payloads: ``PayloadStore`` owns segments, ``attach`` reads them.

::

    caller (owner)                                 worker (fork/spawn/forkserver)
    PayloadStore.share(X): new segment
      cepe_<pid>_<random>, X copied in once
    PayloadStore.dumps(task): big arrays  --tiny-->  loads(task) -> attach(ref),
      and share()d objects -> PayloadRef  pickle     cached per process: array ->
                                                     read-only view, object ->
                                                     unpickled once
    PayloadStore.close(): unlink all                 detach_all() at exit
                                                     (never unlinks)

Rules (DESIGN.md section 6, SHM-NOTES.md): the creator owns and unlinks;
attachers never unlink and, on Python < 3.13, never register with the
resource tracker (gh-82300); on Windows a segment lives while a handle is
open, so the owner keeps its handles until ``close()``. The segments
themselves (names, ``posix_fallocate`` reservation, the tracker workaround,
the crash net) live in ``engine._shm``.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import weakref
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Final, final

import cloudpickle
import numpy as np

from engine import _shm
from engine._attach import (
    PayloadRef,
    attach,
    detach,
    detach_all,
    detach_transient,
    loads,
    readonly_view,
    resolve,
)
from engine._leases import Leases

# Re-exported: importable from here as before the segment code moved to _shm.
from engine._shm import PREFIX as PREFIX
from engine._shm import SHM_DIR as SHM_DIR
from engine._shm import base36 as _base36  # noqa: F401 - tests name segments
from engine._shm import ensure_tracker, sweep_orphans, unlink_segment
from engine._shm import shm_free_bytes as _shm_free_bytes
from engine.errors import ConfigError, PayloadError
from engine.forksafe import register_fork_reset

__all__ = [
    "PayloadRef",
    "PayloadStore",
    "attach",
    "detach",
    "detach_all",
    "detach_transient",
    "ensure_tracker",
    "loads",
    "readonly_view",
    "resolve",
    "sweep_orphans",
    "unlink_segment",
]

# Default automatic-sharing threshold; ParallelConfig.shm_threshold_bytes
# passes its own (engine/config.py DEFAULT_SHM_THRESHOLD_BYTES).
DEFAULT_THRESHOLD_BYTES: Final = 1 << 20
# Dtype kinds whose bytes are the whole value (no pointers): bool, ints,
# floats, complex, datetime64/timedelta64, bytes, str, void/structured.
_FLAT_KINDS: Final = frozenset("biufcmMSUV")
_ARRAY_TYPES: Final = (np.ndarray, np.memmap)


def _is_flat(dtype: np.dtype) -> bool:
    if dtype.fields is not None:
        return all(_is_flat(field[0]) for field in dtype.fields.values())
    if dtype.subdtype is not None:
        return _is_flat(dtype.subdtype[0])
    return dtype.kind in _FLAT_KINDS and not dtype.hasobject


def _is_shareable_array(obj: Any) -> bool:
    # Exact types only: subclasses (masked arrays, matrices) carry more than
    # their buffer and go by pickling. Object dtype never enters shared memory.
    return type(obj) in _ARRAY_TYPES and _is_flat(obj.dtype)


def _dtype_to_str(dtype: np.dtype) -> str:
    if dtype.fields is None and dtype.subdtype is None:
        return dtype.str
    # Structured: dtype.str would be "|V16" and lose the fields; the .npy
    # descr (with padding entries) round-trips names, offsets and itemsize.
    return repr(np.lib.format.dtype_to_descr(dtype))


def _copy_in(
    array: np.ndarray, segment: shared_memory.SharedMemory, order: str
) -> None:
    if array.nbytes == 0:
        return
    contiguous = array.flags.f_contiguous if order == "F" else array.flags.c_contiguous
    if contiguous:
        # Bytes, not elements: a memcpy that also keeps structured padding.
        source = array.reshape(-1, order=order).view(np.uint8)  # type: ignore[call-overload]
        target = np.ndarray((array.nbytes,), np.uint8, buffer=segment.buf)
    else:
        source = array
        target = np.ndarray(array.shape, array.dtype, buffer=segment.buf, order=order)
    target[...] = source
    del target  # release the buffer export so the owner can close its handle


# -- the caller side ----------------------------------------------------------


class _SharingPickler(cloudpickle.Pickler):
    """cloudpickle that replaces large arrays and share()d objects by handles."""

    def __init__(
        self, file: io.BytesIO, store: PayloadStore, used: set[str] | None
    ) -> None:
        super().__init__(file, protocol=cloudpickle.DEFAULT_PROTOCOL)
        self._store = store
        self._used = used

    def reducer_override(self, obj: Any) -> Any:
        ref = self._store._ref_for_pickling(obj, self._used)
        if ref is not None:
            # Unpickling calls attach(ref): a view or the cached object.
            return attach, (ref,)
        return super().reducer_override(obj)


@final
@dataclass(frozen=True, slots=True)
class _Weak:
    """How the store holds an array shared for runs: not keeping it alive."""

    ref: weakref.ref


@final
class PayloadStore:
    """Owner of shared-memory segments for one executor (the caller side).

    Parameters
    ----------
    threshold_bytes : int
        ``dumps`` moves arrays at least this large to shared memory.

    Notes
    -----
    Thread-safe: the executor's dispatcher may call ``dumps`` while the
    user calls ``share``. The store keeps every shared object alive until
    ``close()``, so identity (``id``) keys stay valid. ``close()`` also runs
    from a ``weakref.finalize`` at exit; a forked child never unlinks its
    parent's segments (``forksafe_reset``).
    """

    def __init__(self, *, threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> None:
        valid = isinstance(threshold_bytes, int) and not isinstance(
            threshold_bytes, bool
        )
        if not valid or threshold_bytes < 0:
            msg = (
                f"PayloadStore(threshold_bytes={threshold_bytes!r}) is invalid; "
                "allowed: an int >= 0."
            )
            raise ConfigError(msg)
        self.threshold_bytes = threshold_bytes
        self._lock = threading.RLock()
        self._owned = _shm.OwnedSegments()
        self._finalizer = weakref.finalize(self, _shm.unlink_owned, self._owned)
        self._closed = False
        self._by_id: dict[int, tuple[PayloadRef, Any]] = {}
        self._by_key: dict[str, Any] = {}
        self._views: dict[str, Any] = {}
        self._leases = Leases()
        self._bytes_shared = 0
        register_fork_reset(self)

    # -- sharing ---------------------------------------------------------------

    def share(self, obj: Any) -> PayloadRef:
        """Place ``obj`` in shared memory once and return its handle.

        Parameters
        ----------
        obj : numpy.ndarray or object
            An array with a flat dtype goes into a segment as is (read later
            as a zero-copy view); any other object, object-dtype arrays
            included, is cloudpickled once into a segment.

        Returns
        -------
        PayloadRef
            The same handle for the same object (identity), until ``close()``.

        Raises
        ------
        PayloadError
            The store is closed, or the segment cannot be created (e.g.
            ``/dev/shm`` too small); nothing is left behind.
        """
        if isinstance(obj, PayloadRef):
            return obj
        with self._lock:
            self._check_open()
            known = self._known(obj)
            if known is not None and known.transient:
                # Shared for a run so far: now for the store's life.
                self._leases.forget(known.key)
                known = dataclasses.replace(known, transient=False)
                self._by_id[id(obj)] = (known, obj)
                self._by_key[known.key] = obj
            if known is not None:
                return known
            if _is_shareable_array(obj):
                ref = self._share_array(obj)
            else:
                ref = self._share_object(obj)
            self._by_id[id(obj)] = (ref, obj)
            self._by_key[ref.key] = obj
            self._bytes_shared += ref.nbytes
            return ref

    def _check_open(self) -> None:
        if self._closed:
            msg = (
                "this PayloadStore is closed: its segments were unlinked. Share "
                "payloads while the executor is open (inside its with-block)."
            )
            raise PayloadError(msg)

    def _adopt(self, size: int) -> shared_memory.SharedMemory:
        # _shm_free_bytes is looked up here, at call time, so that tests can
        # patch engine.payload._shm_free_bytes (test_payload.py, _payload_tasks).
        segment = _shm.create_segment(size, free_bytes=_shm_free_bytes)
        with self._owned.lock:
            self._owned.segments[segment.name] = segment
        return segment

    def _drop(self, segment: shared_memory.SharedMemory) -> None:
        with self._owned.lock:
            self._owned.segments.pop(segment.name, None)
        _shm.close_and_unlink(segment)

    def _known(self, obj: Any) -> PayloadRef | None:
        """The handle of ``obj`` if this very object was shared, else None."""
        entry = self._by_id.get(id(obj))
        if entry is None:
            return None
        ref, holder = entry
        if type(holder) is _Weak:  # transient: the id may be a new object's
            return ref if holder.ref() is obj else None
        return ref

    def _share_array(self, array: np.ndarray, *, transient: bool = False) -> PayloadRef:
        # Keep Fortran order; anything not contiguous is copied C-contiguous
        # by the single copy into the segment below.
        order = (
            "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
        )
        segment = self._adopt(array.nbytes)
        try:
            _copy_in(array, segment, order)
        except BaseException:
            # KeyboardInterrupt mid-copy included: unlink before propagating.
            self._drop(segment)
            raise
        return PayloadRef(
            key=segment.name,
            name=segment.name,
            kind="array",
            nbytes=array.nbytes,
            shape=tuple(array.shape),
            dtype=_dtype_to_str(array.dtype),
            order=order,
            transient=transient,
        )

    def _share_object(self, obj: Any) -> PayloadRef:
        try:
            data = cloudpickle.dumps(obj, protocol=cloudpickle.DEFAULT_PROTOCOL)
        except Exception as exc:
            msg = (
                f"cannot share {type(obj).__name__} object: pickling failed ({exc}). "
                "Share only picklable objects, or create it inside the task."
            )
            raise PayloadError(msg) from exc
        segment = self._adopt(len(data))
        try:
            segment.buf[: len(data)] = data
        except BaseException:
            self._drop(segment)
            raise
        return PayloadRef(
            key=segment.name, name=segment.name, kind="object", nbytes=len(data)
        )

    def _ref_for_pickling(self, obj: Any, used: set[str] | None) -> PayloadRef | None:
        """Return the handle replacing ``obj`` in ``dumps``, or None to pickle it."""
        if type(obj) in _ARRAY_TYPES:
            with self._lock:
                known = self._known(obj)
                if known is not None:
                    if used is not None:
                        self._leases.take(known.key, used)
                    return known
            if obj.nbytes >= self.threshold_bytes and _is_flat(obj.dtype):
                if used is None:
                    return self.share(obj)
                return self._share_for_run(obj, used)
            return None
        if self._by_id:
            return self._known(obj)
        return None

    def _share_for_run(self, array: np.ndarray, used: set[str]) -> PayloadRef:
        """Share ``array`` in a transient segment leased by the run ``used``."""
        with self._lock:
            self._check_open()
            self._unlink_leased(self._leases.reap())
            ref = self._share_array(array, transient=True)
            holder = self._leases.add(ref.key, array)
            self._leases.take(ref.key, used)
            self._by_id[id(array)] = (ref, _Weak(holder))
            self._bytes_shared += ref.nbytes
            return ref

    def release(self, used: set[str]) -> None:
        """End a run's lease on its transient segments (see ``dumps``).

        A segment no run uses is unlinked once its original array is gone;
        until then a later run with the same array reuses it.
        """
        with self._lock:
            if self._closed:
                return
            self._unlink_leased(self._leases.release(used))
            self._unlink_leased(self._leases.reap())

    def _unlink_leased(self, keys: list[tuple[str, int]]) -> None:
        for key, object_id in keys:
            entry = self._by_id.get(object_id)
            if entry is not None and entry[0].key == key:
                del self._by_id[object_id]
            self._views.pop(key, None)
            with self._owned.lock:
                segment = self._owned.segments.get(key)
            if segment is not None:
                self._drop(segment)

    def dumps(self, obj: Any, *, used: set[str] | None = None) -> bytes:
        """Pickle ``obj`` with large arrays and shared objects as handles.

        Parameters
        ----------
        obj : object
            A task, function, closure, ``functools.partial``, container...
            Every numpy array of at least ``threshold_bytes`` (flat dtype)
            found anywhere in it is shared once (keyed by identity), and
            every object previously given to ``share`` is replaced by its
            handle, except exact ``dict``/``list``/``tuple``/``set``/``str``
            instances, which pickle never offers for replacement (pass
            their handle instead).
        used : set of str, optional
            A run's lease set: arrays shared here are then transient (for
            the run, not the store's life) and their keys are added to it;
            pass it to ``release`` when the run ends. Without it, shared
            arrays stay until ``close()``.

        Returns
        -------
        bytes
            A cloudpickle; ``loads`` in any process attaches the handles.

        Raises
        ------
        PayloadError
            The store is closed, or an array could not be shared.
        """
        self._check_open()
        buffer = io.BytesIO()
        _SharingPickler(buffer, self, used).dump(obj)
        return buffer.getvalue()

    # -- reading in the owner ------------------------------------------------------

    def local(self, ref: PayloadRef) -> Any:
        """Return the value behind ``ref`` in the owner, without copies.

        Parameters
        ----------
        ref : PayloadRef
            A handle returned by this store.

        Returns
        -------
        object
            A read-only view of the original array, or the original object.
            A handle of another store is attached instead.
        """
        with self._lock:
            original = self._by_key.get(ref.key, _ABSENT)
            if original is _ABSENT:
                return attach(ref)
            view = self._views.get(ref.key)
            if view is None:
                view = self._views[ref.key] = readonly_view(original)
            return view

    def resolve_local(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Replace top-level ``PayloadRef`` elements of ``args`` by ``local``."""
        return tuple(self.local(a) if isinstance(a, PayloadRef) else a for a in args)

    # -- bookkeeping ------------------------------------------------------------------

    @property
    def bytes_shared(self) -> int:
        """Total payload bytes placed in segments by this store."""
        return self._bytes_shared

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    def segment_names(self) -> tuple[str, ...]:
        """Return the names of the segments this store owns (for crash nets)."""
        with self._owned.lock:
            return tuple(self._owned.segments)

    def close(self) -> None:
        """Unlink every segment this store created; idempotent.

        Notes
        -----
        Workers that still map a segment keep reading it until they detach
        (POSIX frees the memory then); new attaches fail with
        ``PayloadError``. A forked child's store never unlinks.
        """
        with self._lock:
            self._closed = True
            self._by_id.clear()
            self._by_key.clear()
            self._views.clear()
            self._leases.clear()
        _shm.unlink_owned(self._owned)
        self._finalizer.detach()

    def forksafe_reset(self) -> None:
        """Forget the parent's segments in a forked child (never unlinks)."""
        # Replaced, not acquired: a parent thread may have held the locks.
        self._lock = threading.RLock()
        self._finalizer.detach()
        self._owned = _shm.OwnedSegments()
        self._finalizer = weakref.finalize(self, _shm.unlink_owned, self._owned)
        self._by_id = {}
        self._by_key = {}
        self._views = {}
        self._leases = Leases()
        self._bytes_shared = 0

    def __enter__(self) -> PayloadStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> Any:
        msg = (
            "a PayloadStore cannot be pickled: it owns this process's segments. "
            "Send its PayloadRefs (share()) or dumps() output instead."
        )
        raise TypeError(msg)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"PayloadStore({state}, segments={len(self._owned.segments)}, "
            f"bytes_shared={self._bytes_shared})"
        )


_ABSENT: Final = object()
