"""``ParallelConfig``: the frozen, validated configuration of an executor.

Precedence is explicit argument > ``CE_PARALLEL`` > default, resolved by
``ParallelConfig.from_env`` at call time (never at import).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, final

from engine import _env
from engine.errors import ConfigError

STRATEGIES: Final = ("auto", "serial", "threads", "processes", "joblib", "dask")
START_METHODS: Final = _env.START_METHODS

# calibrated-explanations' default gating threshold (ParallelConfig.min_batch_size).
DEFAULT_MIN_BATCH_SIZE: Final = 8
# Arrays at least this large move to shared memory automatically (issue 3);
# below it, pickling a copy is cheaper than creating a segment (ci/bench/payload.py).
DEFAULT_SHM_THRESHOLD_BYTES: Final = 1024 * 1024
DEFAULT_CANCEL_GRACE_S: Final = 1.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(*, field_name: str, value: object, allowed: str) -> ConfigError:
    msg = f"ParallelConfig.{field_name}={value!r} is invalid; allowed: {allowed}."
    return ConfigError(msg)


@final
@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How an executor runs work: strategy, workers, chunking and gating.

    Parameters
    ----------
    strategy : str
        ``"auto"`` (default), ``"serial"``, ``"threads"``, ``"processes"``,
        ``"joblib"`` or ``"dask"``.
    max_workers : int or None
        Worker count; ``None`` means the usable CPU count.
    start_method : str or None
        ``"fork"``, ``"spawn"``, ``"forkserver"``, or ``None`` for the
        platform's safe default.
    min_batch_size : int
        Gating threshold: a run with fewer work items runs serially.
    instance_chunk_size, feature_chunk_size : int or None
        Items per chunk; ``None`` lets the engine choose.
    task_size_hint_bytes : int or None
        Expected pickled size of one work item, for the auto strategy.
    shm_threshold_bytes : int
        Arrays at least this large go to shared memory automatically.
    force_serial_on_failure : bool
        Re-run chunks lost to a broken worker serially instead of raising.
    cancel_grace_s : float
        Seconds workers get to stop cooperatively before they are killed.
    timeout_s : float or None
        Limit on one run's wall time.
    worker_max_tasks : int or None
        Recycle a worker process after this many chunks.
    prefer : tuple of str
        Strategies auto may choose, in order of preference (empty: all).
    dask_address : str or None
        Address of an existing dask scheduler.
    telemetry : callable or None
        Called with each telemetry event (a dict).
    """

    strategy: str = "auto"
    max_workers: int | None = None
    start_method: str | None = None
    min_batch_size: int = DEFAULT_MIN_BATCH_SIZE
    instance_chunk_size: int | None = None
    feature_chunk_size: int | None = None
    task_size_hint_bytes: int | None = None
    shm_threshold_bytes: int = DEFAULT_SHM_THRESHOLD_BYTES
    force_serial_on_failure: bool = False
    cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S
    timeout_s: float | None = None
    worker_max_tasks: int | None = None
    prefer: tuple[str, ...] = ()
    dask_address: str | None = None
    telemetry: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise _fail(
                field_name="strategy",
                value=self.strategy,
                allowed=" | ".join(STRATEGIES),
            )
        self._check_positive_int("max_workers", optional=True)
        if self.start_method is not None and self.start_method not in START_METHODS:
            raise _fail(
                field_name="start_method",
                value=self.start_method,
                allowed="fork | spawn | forkserver | None",
            )
        self._check_positive_int("min_batch_size", optional=False)
        self._check_positive_int("instance_chunk_size", optional=True)
        self._check_positive_int("feature_chunk_size", optional=True)
        self._check_positive_int("worker_max_tasks", optional=True)
        hint = self.task_size_hint_bytes
        if hint is not None and not (_is_int(hint) and hint >= 0):
            raise _fail(
                field_name="task_size_hint_bytes",
                value=hint,
                allowed="an int >= 0 or None",
            )
        threshold = self.shm_threshold_bytes
        if not (_is_int(threshold) and threshold >= 0):
            raise _fail(
                field_name="shm_threshold_bytes", value=threshold, allowed="an int >= 0"
            )
        if not isinstance(self.force_serial_on_failure, bool):
            raise _fail(
                field_name="force_serial_on_failure",
                value=self.force_serial_on_failure,
                allowed="True | False",
            )
        self._check_seconds("cancel_grace_s", optional=False, allow_zero=True)
        self._check_seconds("timeout_s", optional=True, allow_zero=False)
        self._check_prefer()
        address = self.dask_address
        if address is not None and not (isinstance(address, str) and address.strip()):
            raise _fail(
                field_name="dask_address",
                value=address,
                allowed="a scheduler address such as tcp://host:8786",
            )
        if self.telemetry is not None and not callable(self.telemetry):
            raise _fail(
                field_name="telemetry",
                value=self.telemetry,
                allowed="a callable taking one dict, or None",
            )

    def _check_positive_int(self, name: str, *, optional: bool) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        if not (_is_int(value) and value >= 1):
            allowed = "an int >= 1 or None" if optional else "an int >= 1"
            raise _fail(field_name=name, value=value, allowed=allowed)

    def _check_seconds(self, name: str, *, optional: bool, allow_zero: bool) -> None:
        value = getattr(self, name)
        if value is None and optional:
            return
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value >= 0 if allow_zero else value > 0)
        )
        if not ok:
            bound = ">= 0" if allow_zero else "> 0"
            allowed = f"a finite number of seconds {bound}" + (
                " or None" if optional else ""
            )
            raise _fail(field_name=name, value=value, allowed=allowed)

    def _check_prefer(self) -> None:
        prefer = self.prefer
        choosable = [name for name in STRATEGIES if name != "auto"]
        if isinstance(prefer, str) or not isinstance(prefer, tuple):
            raise _fail(
                field_name="prefer",
                value=prefer,
                allowed=f"a tuple of strategy names from {choosable}",
            )
        for name in prefer:
            if name not in choosable:
                raise _fail(
                    field_name="prefer",
                    value=prefer,
                    allowed=f"a tuple of strategy names from {choosable}",
                )
        if len(set(prefer)) != len(prefer):
            raise _fail(
                field_name="prefer",
                value=prefer,
                allowed="a tuple without repeated names",
            )

    @classmethod
    def from_env(cls, **overrides: Any) -> ParallelConfig:
        """Build a config from ``CE_PARALLEL``, then explicit overrides.

        ``CE_PARALLEL=off`` (or ``0``, ``false``, ``no``, ``disable``) always
        yields ``strategy="serial"``, whatever else is set.

        Parameters
        ----------
        **overrides
            Config fields; they take precedence over the environment.

        Raises
        ------
        ConfigError
            For a bad ``CE_PARALLEL`` token or field value.
        """
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            msg = (
                f"ParallelConfig has no field(s) {unknown}; see docs/configuration.md."
            )
            raise ConfigError(msg)
        settings = _env.read_ce_parallel()
        values: dict[str, Any] = {**settings.overrides, **overrides}
        if settings.enabled is False:
            values["strategy"] = "serial"
        return cls(**values)

    def replace(self, **changes: Any) -> ParallelConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-friendly dict (callables by name)."""
        out: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if callable(value):
                value = getattr(value, "__qualname__", repr(value))
            elif isinstance(value, tuple):
                value = list(value)
            out[item.name] = value
        return out


def describe_env() -> Mapping[str, Any]:
    """Return what ``CE_PARALLEL`` says now, for ``python -m engine info``."""
    settings = _env.read_ce_parallel()
    return {
        "CE_PARALLEL": settings.raw,
        "enabled": settings.enabled,
        "overrides": dict(settings.overrides),
        "accepted_for_compatibility": list(settings.ignored_compat),
    }
