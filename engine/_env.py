"""The only reader of ``os.environ``: parses ``CE_PARALLEL`` at call time.

The grammar is a compatible superset of calibrated-explanations' (1.0.x):
comma-separated tokens, each a switch (``on``/``off``), a strategy word or a
``key=value`` directive. Unlike calibrated-explanations, an unknown token or a
bad value raises ``ConfigError`` naming the token and the accepted forms: we do
not silently run something other than what was asked.

Nothing here runs at import time; ``parse_ce_parallel`` is called whenever a
configuration is resolved, so a changed environment takes effect at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ConfigError

ENV_VAR = "CE_PARALLEL"

DISABLE_WORDS = frozenset({"off", "0", "false", "no", "disable"})
ENABLE_WORDS = frozenset({"on", "1", "true", "yes", "enable"})
# "sequential" is calibrated-explanations' word for serial.
STRATEGY_WORDS = {
    "serial": "serial",
    "sequential": "serial",
    "threads": "threads",
    "processes": "processes",
    "joblib": "joblib",
    "dask": "dask",
    "auto": "auto",
}
START_METHODS = ("fork", "spawn", "forkserver")

_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class EnvSettings:
    """What ``CE_PARALLEL`` said, as config field overrides.

    ``enabled`` is ``None`` when no switch word was given, ``False`` for
    ``off`` (serial whatever else is set) and ``True`` for ``on``.
    """

    raw: str | None = None
    enabled: bool | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    ignored_compat: tuple[str, ...] = ()


def _accepted_forms() -> str:
    return (
        "on|1|true|yes|enable, off|0|false|no|disable, "
        "serial|sequential|threads|processes|joblib|dask|auto, "
        "workers=N, min_batch=N, instance_chunk=N, feature_chunk=N, "
        "task_bytes=N, force_serial=on|off, start=fork|spawn|forkserver, "
        "prefer=a+b, shm_threshold=N[k|M|G], timeout=SECONDS, "
        "dask=ADDRESS, granularity=instance, min_instances=N, tiny=N"
    )


def _bad(token: str, why: str) -> ConfigError:
    msg = (
        f"{ENV_VAR} token {token!r} is invalid: {why}. "
        f"Accepted forms: {_accepted_forms()}."
    )
    return ConfigError(msg)


def _int_value(token: str, value: str, *, minimum: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise _bad(token, f"{value!r} is not an integer") from None
    if number < minimum:
        raise _bad(token, f"the value must be >= {minimum}")
    return number


def _size_value(token: str, value: str) -> int:
    match = _SIZE_RE.match(value)
    if match is None:
        raise _bad(token, f"{value!r} is not a byte size such as 1048576, 512k or 2M")
    return int(match.group(1)) * _SIZE_SUFFIXES[match.group(2).lower()]


def _float_value(token: str, value: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        raise _bad(token, f"{value!r} is not a number of seconds") from None
    if not number > 0 or number != number or number == float("inf"):
        raise _bad(token, "the number of seconds must be finite and > 0")
    return number


def _bool_value(token: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ENABLE_WORDS:
        return True
    if lowered in DISABLE_WORDS:
        return False
    raise _bad(token, f"{value!r} is not one of on|1|true|yes|enable|off|0|false|no")


def _start_value(token: str, value: str) -> str:
    lowered = value.strip().lower()
    if lowered not in START_METHODS:
        raise _bad(token, f"start method {value!r} is not fork, spawn or forkserver")
    return lowered


def _prefer_value(token: str, value: str) -> tuple[str, ...]:
    names = [part.strip().lower() for part in value.split("+") if part.strip()]
    if not names:
        raise _bad(token, "prefer= needs at least one strategy, e.g. processes+threads")
    resolved = []
    for name in names:
        if name not in STRATEGY_WORDS or STRATEGY_WORDS[name] == "auto":
            raise _bad(token, f"{name!r} is not a strategy auto can choose")
        resolved.append(STRATEGY_WORDS[name])
    return tuple(resolved)


def _address_value(token: str, value: str) -> str:
    address = value.strip()
    if not address:
        raise _bad(token, "dask= needs a scheduler address such as tcp://host:8786")
    return address


# key -> (config field, value parser)
_DIRECTIVES: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "workers": ("max_workers", lambda t, v: _int_value(t, v, minimum=1)),
    "min_batch": ("min_batch_size", lambda t, v: _int_value(t, v, minimum=1)),
    # calibrated-explanations' own gating knobs; both gate like min_batch.
    "min_instances": ("min_batch_size", lambda t, v: _int_value(t, v, minimum=1)),
    "tiny": ("min_batch_size", lambda t, v: _int_value(t, v, minimum=1)),
    "instance_chunk": ("instance_chunk_size", lambda t, v: _int_value(t, v, minimum=1)),
    "feature_chunk": ("feature_chunk_size", lambda t, v: _int_value(t, v, minimum=1)),
    "task_bytes": ("task_size_hint_bytes", _size_value),
    "force_serial": ("force_serial_on_failure", _bool_value),
    "start": ("start_method", _start_value),
    "prefer": ("prefer", _prefer_value),
    "shm_threshold": ("shm_threshold_bytes", _size_value),
    "timeout": ("timeout_s", _float_value),
    "dask": ("dask_address", _address_value),
}


def parse_ce_parallel(raw: str | None) -> EnvSettings:
    """Parse a ``CE_PARALLEL`` value into config overrides.

    Raises
    ------
    ConfigError
        For an unknown token or a bad value, naming the token and the forms
        accepted.
    """
    if raw is None or not raw.strip():
        return EnvSettings(raw=raw)
    enabled: bool | None = None
    overrides: dict[str, Any] = {}
    compat: list[str] = []
    for token in (part.strip() for part in raw.split(",")):
        if not token:
            continue
        lowered = token.lower()
        if lowered in DISABLE_WORDS:
            enabled = False
        elif lowered in ENABLE_WORDS:
            enabled = True if enabled is None else enabled
        elif lowered in STRATEGY_WORDS:
            overrides["strategy"] = STRATEGY_WORDS[lowered]
        elif "=" in token:
            key, value = token.split("=", 1)
            key = key.strip().lower()
            if key == "granularity":
                # calibrated-explanations accepts only "instance" and raises on
                # "feature"; instance chunks are our unit of work too.
                if value.strip().lower() != "instance":
                    raise _bad(token, "only granularity=instance is accepted")
                compat.append(token)
                continue
            if key not in _DIRECTIVES:
                raise _bad(token, f"unknown key {key!r}")
            field_name, parse = _DIRECTIVES[key]
            overrides[field_name] = parse(token, value)
        else:
            raise _bad(token, "unknown word")
    return EnvSettings(
        raw=raw, enabled=enabled, overrides=overrides, ignored_compat=tuple(compat)
    )


def read_ce_parallel() -> EnvSettings:
    """Read and parse ``CE_PARALLEL`` from the environment now."""
    return parse_ce_parallel(os.environ.get(ENV_VAR))


def is_forced_off() -> bool:
    """Return True when ``CE_PARALLEL`` says off (plain serial, always).

    Read on every map, so setting the variable takes effect at once; the
    answer for each value seen is kept (a bad value raises every time).
    """
    raw = os.environ.get(ENV_VAR)
    off = _FORCED_OFF.get(raw)
    if off is None:
        off = parse_ce_parallel(raw).enabled is False
        if len(_FORCED_OFF) < _FORCED_OFF_KEEP:
            _FORCED_OFF[raw] = off
    return off


# is_forced_off's answers by raw value (a process sees a handful of values).
_FORCED_OFF: dict[str | None, bool] = {}
_FORCED_OFF_KEEP = 64


def get(name: str, default: str | None = None) -> str | None:
    """Return one environment variable (the engine's single access point)."""
    return os.environ.get(name, default)


def worker_environment(thread_cap: int) -> dict[str, str]:
    """Return the thread-cap variables a worker sets before importing numpy."""
    cap = str(max(1, thread_cap))
    names = (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "BLIS_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "NUMBA_NUM_THREADS",
    )
    return dict.fromkeys(names, cap)


def apply_environment(values: Mapping[str, str]) -> None:
    """Set environment variables in this process (workers only)."""
    os.environ.update(values)
