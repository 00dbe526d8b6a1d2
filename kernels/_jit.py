"""The numba entry point: the only module in the project that imports numba.

Every kernel core is compiled through :func:`njit`, one preset for all of
them (DESIGN.md section 2): ``cache=True`` so worker processes load compiled
code from disk instead of recompiling, ``nogil=True`` so the threads strategy
can run kernels side by side, ``fastmath`` off because the kernels must be
bit-identical to numpy, and ``parallel=False`` because parallelism belongs to
the engine, not to the kernels.

When the environment sets ``NUMBA_DISABLE_JIT=1``, numba itself returns the
undecorated Python function, so every core still runs (slowly) as plain
Python on numpy arrays; :func:`is_jit_enabled` tells the two apart without
this package ever reading the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

import numba

__all__ = ["JIT_OPTIONS", "is_jit_enabled", "njit"]

_F = TypeVar("_F", bound=Callable[..., Any])

JIT_OPTIONS: Final[dict[str, bool]] = {
    "cache": True,
    "nogil": True,
    "fastmath": False,
    "parallel": False,
}


def njit(func: _F) -> _F:
    """Compile ``func`` lazily with the project's one numba preset.

    Parameters
    ----------
    func : callable
        A numba-compilable function (no Python objects, numpy arrays only).

    Returns
    -------
    callable
        The numba dispatcher, or ``func`` itself when numba's JIT is disabled.
    """
    return numba.njit(**JIT_OPTIONS)(func)  # type: ignore[no-any-return]


def is_jit_enabled() -> bool:
    """Tell whether kernel cores are compiled (False under NUMBA_DISABLE_JIT).

    Returns
    -------
    bool
        Whether numba compiles (``numba.config.DISABLE_JIT`` is off).
    """
    return not bool(numba.config.DISABLE_JIT)
