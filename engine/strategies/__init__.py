"""Registry of strategies; optional ones are imported only when used.

``_x.py`` modules wrap the optional dependency ``x`` (STYLE.md rule 5), so
importing ``engine`` never imports joblib or dask.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Final, NamedTuple

from engine.errors import StrategyUnavailableError

if TYPE_CHECKING:
    from engine.strategies.base import Strategy


class _Entry(NamedTuple):
    module: str
    cls: str
    requires: tuple[str, ...]
    install: str


_REGISTRY: Final[dict[str, _Entry]] = {
    "serial": _Entry("engine.strategies.serial", "SerialStrategy", (), ""),
    "threads": _Entry("engine.strategies.threads", "ThreadsStrategy", (), ""),
    "processes": _Entry("engine.strategies.processes", "ProcessesStrategy", (), ""),
    "joblib": _Entry(
        "engine.strategies._joblib",
        "JoblibStrategy",
        ("joblib",),
        "pip install 'ce-parallel-engine[joblib]'",
    ),
    "dask": _Entry(
        "engine.strategies._dask",
        "DaskStrategy",
        ("dask", "distributed"),
        "pip install 'ce-parallel-engine[dask]'",
    ),
}


def strategy_names() -> tuple[str, ...]:
    """Return every known strategy name, available or not."""
    return tuple(_REGISTRY)


# find_spec walks sys.path (~0.1 ms a name); auto asks on every run, so the
# answers are kept for the life of the process.
_FOUND: dict[str, bool] = {}


def _importable(module: str) -> bool:
    found = _FOUND.get(module)
    if found is None:
        found = _FOUND[module] = importlib.util.find_spec(module) is not None
    return found


def unavailable_reason(name: str) -> str | None:
    """Return why strategy ``name`` cannot be used here, or ``None``."""
    entry = _REGISTRY.get(name)
    if entry is None:
        return f"unknown strategy {name!r}; known: {', '.join(_REGISTRY)}"
    for dependency in entry.requires:
        if not _importable(dependency):
            return f"{dependency} is not installed; {entry.install}"
    if not _importable(entry.module):
        return f"{entry.module} is not part of this build"
    return None


def available_strategies() -> list[str]:
    """Return the names of the strategies usable here, serial first."""
    return [name for name in _REGISTRY if unavailable_reason(name) is None]


def load(name: str) -> type[Strategy]:
    """Import and return the class of strategy ``name``.

    Raises
    ------
    StrategyUnavailableError
        When its optional dependency is missing; the message says what to
        install.
    """
    reason = unavailable_reason(name)
    if reason is not None:
        msg = f"strategy {name!r} is unavailable: {reason}"
        raise StrategyUnavailableError(msg)
    entry = _REGISTRY[name]
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        msg = f"strategy {name!r} failed to import ({exc}); {entry.install or 'reinstall'}"
        raise StrategyUnavailableError(msg) from exc
    return getattr(module, entry.cls)
