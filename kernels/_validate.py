"""Input checks shared by the kernels' public wrappers.

A wrapper checks every array before the njit core sees it, so a wrong dtype,
shape or layout fails with a message naming the argument instead of a numba
typing error or a silent wrong answer. Inputs are handed to the cores as
read-only views: one compiled specialisation serves both writable arrays and
the read-only shared-memory views that workers receive.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_array", "check_same", "readonly"]

_KIND_NAMES = {"f": "float64", "i": "int64", "b": "bool"}
_DTYPES = {"f": np.dtype(np.float64), "i": np.dtype(np.int64), "b": np.dtype(np.bool_)}


def check_array(name: str, value: Any, kind: str, ndim: int) -> np.ndarray:
    """Return ``value`` if it is a C-contiguous array of the expected kind.

    ``kind`` is "f" (float64), "i" (int64) or "b" (bool).
    """
    if not isinstance(value, np.ndarray):
        msg = (
            f"{name} must be a numpy.ndarray of {_KIND_NAMES[kind]}, got "
            f"{type(value).__name__}; convert it with numpy.asarray first"
        )
        raise TypeError(msg)
    if value.dtype != _DTYPES[kind]:
        msg = (
            f"{name} must have dtype {_KIND_NAMES[kind]}, got {value.dtype}; "
            f"convert it with .astype(numpy.{_KIND_NAMES[kind]})"
        )
        raise TypeError(msg)
    if value.ndim != ndim:
        msg = f"{name} must be {ndim}-dimensional, got shape {value.shape}"
        raise ValueError(msg)
    if not value.flags.c_contiguous:
        msg = (
            f"{name} must be C-contiguous; pass numpy.ascontiguousarray({name}) "
            "instead of a strided view"
        )
        raise ValueError(msg)
    return value


def check_same(name: str, actual: int, expected_name: str, expected: int) -> None:
    """Raise ValueError if a dimension does not match its counterpart."""
    if actual != expected:
        msg = f"{name} is {actual} but must equal {expected_name} ({expected})"
        raise ValueError(msg)


def readonly(array: np.ndarray) -> np.ndarray:
    """Return a read-only view of ``array`` (no copy)."""
    view = array.view()
    view.flags.writeable = False
    return view
