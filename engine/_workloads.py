"""The ablation workloads of BENCH.md (W1-W7) behind one small interface.

Each workload builds its data once (``setup``), then runs one timed
repetition under a named configuration (``run``). Configurations are our
strategies (``serial``, ``threads``, ``processes-fork``, ``processes-spawn``,
``joblib``, ``auto``) plus external reference points: ``loop`` (a plain list
comprehension) and ``ce-default`` (calibrated-explanations' fixed default:
worker processes, chunks of 8 items, the payload pickled into every task).
Task functions live at module level so spawn workers can import them.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine import ParallelConfig, ParallelExecutor, strategies
from engine._planner import RAN_IN_CALLER

STRATEGY_CONFIGS: dict[str, dict[str, Any]] = {
    "serial": {"strategy": "serial"},
    "threads": {"strategy": "threads", "max_workers": 2},
    "processes-fork": {
        "strategy": "processes",
        "max_workers": 2,
        "start_method": "fork",
    },
    "processes-spawn": {
        "strategy": "processes",
        "max_workers": 2,
        "start_method": "spawn",
    },
    "joblib": {"strategy": "joblib", "max_workers": 2},
    "auto": {"strategy": "auto", "max_workers": 2},
}
# calibrated-explanations 1.0.x default when parallelism is enabled.
CE_DEFAULT_CHUNK = 8
# The warm-up brings every configuration to its steady state: fixed
# strategies start their pool on the first call; auto starts one only once
# repeated runs pay for its start-up (auto.choose_amortised, and
# AutoPlanner.split for maps under 20 ms), so it is warmed up with calls for
# up to AUTO_WARMUP_S (at most AUTO_WARMUP_CALLS): W1 of ablate --quick
# forgoes ~30 ms a call against a 0.35 s start-up, W6 ~2 ms (175 calls).
AUTO_WARMUP_S = 3.0
AUTO_WARMUP_CALLS = 400


def warm_up(name: str, run: Callable[[], Any]) -> Any:
    """Run configuration ``name`` to its steady state; return the first output."""
    started = time.perf_counter()
    first = run()
    if name == "auto":
        for _ in range(AUTO_WARMUP_CALLS - 1):
            if time.perf_counter() - started >= AUTO_WARMUP_S:
                break
            run()
    return first


def strategies_ran(executor: ParallelExecutor | None, since_run: int) -> dict[str, int]:
    """Count ``executor``'s runs after its run number ``since_run`` by what ran.

    Keys: ``processes/fork`` (strategy/start method), ``threads``, ``serial``,
    and ``caller`` for auto's maps run in one loop in the caller. Counts
    cover at most the executor's last ``KEEP_RUNS`` runs.
    """
    if executor is None:
        return {}
    counts: dict[str, int] = {}
    for run in executor.telemetry.runs:
        if run.run_id <= since_run:
            continue
        key = run.strategy
        if run.start_method:
            key = f"{key}/{run.start_method}"
        elif run.strategy == "serial" and run.reason.endswith(RAN_IN_CALLER):
            key = "caller"
        counts[key] = counts.get(key, 0) + 1
    return counts


def last_run_id(executor: ParallelExecutor | None) -> int:
    """The id of ``executor``'s latest run (0 before its first)."""
    runs = executor.telemetry.runs if executor is not None else []
    return runs[-1].run_id if runs else 0


def config_available(name: str) -> str | None:
    """Return why configuration ``name`` cannot run here, or ``None``."""
    if name in ("loop", "ce-default"):
        return None
    fields = STRATEGY_CONFIGS.get(name)
    if fields is None:
        return f"unknown configuration {name!r}"
    if fields["strategy"] == "auto":
        return None
    return strategies.unavailable_reason(fields["strategy"])


def identity(x: Any) -> Any:
    """W4's task."""
    return x


def slice_sum(index: int, array: np.ndarray, n_slices: int) -> float:
    """W5's task: sum one slice of a large array."""
    step = math.ceil(len(array) / n_slices)
    return float(array[index * step : (index + 1) * step].sum())


def busy_ms(x: int, ms: float = 1.0) -> int:
    """W6's task: about ``ms`` milliseconds of pure-Python work."""
    deadline = time.perf_counter() + ms / 1000.0
    while time.perf_counter() < deadline:
        pass
    return x


@dataclass
class Workload:
    """One BENCH.md workload: data built once, one timed repetition per call."""

    id: str
    title: str
    configs: tuple[str, ...]
    baseline: str
    build: Callable[[bool], dict[str, Any]]
    body: Callable[[dict[str, Any], Callable[..., list[Any]]], Any]
    state: dict[str, Any] = field(default_factory=dict)
    executors: dict[str, ParallelExecutor] = field(default_factory=dict)
    pools: dict[str, Any] = field(default_factory=dict)

    def unavailable_reason(self, name: str) -> str | None:
        """Return why configuration ``name`` cannot run here, or ``None``."""
        return config_available(name)

    def skip_reason(self, name: str, *, quick: bool) -> str | None:
        """Return why ``name`` is left out of this run, or ``None``."""
        return self.unavailable_reason(name)

    def setup(self, quick: bool) -> None:
        """Build the data (not timed)."""
        self.state = self.build(quick)

    def _mapper(self, name: str) -> Callable[..., list[Any]]:
        """Return ``map(fn, items, *args)`` for configuration ``name`` (kept warm)."""
        if name == "loop":
            return lambda fn, items, *args: [fn(item, *args) for item in items]
        if name == "ce-default":
            pool = self.pools.get(name)
            if pool is None:
                pool = concurrent.futures.ProcessPoolExecutor(max_workers=2)
                self.pools[name] = pool
            return lambda fn, items, *args: list(
                pool.map(
                    functools.partial(_call, fn, args),
                    items,
                    chunksize=CE_DEFAULT_CHUNK,
                )
            )
        executor = self.executors.get(name)
        if executor is None:
            fields = {"min_batch_size": 1, **STRATEGY_CONFIGS[name]}
            executor = ParallelExecutor(ParallelConfig(**fields)).__enter__()
            self.executors[name] = executor
        return executor.map

    def run(self, name: str) -> Any:
        """Run one repetition under configuration ``name``."""
        return self.body(self.state, self._mapper(name))

    def executor(self, name: str) -> ParallelExecutor | None:
        """The engine executor behind configuration ``name``, once it has run."""
        return self.executors.get(name)

    def close(self) -> None:
        """Shut every executor and pool down."""
        for executor in self.executors.values():
            executor.shutdown()
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self.executors.clear()
        self.pools.clear()


def _call(fn: Callable[..., Any], args: tuple[Any, ...], item: Any) -> Any:
    return fn(item, *args)


GENERIC = ("loop", "ce-default", *STRATEGY_CONFIGS)


def _w4_build(quick: bool) -> dict[str, Any]:
    return {"items": list(range(10_000))}


def _w4_body(state: dict[str, Any], mapper: Callable[..., list[Any]]) -> None:
    out = mapper(identity, state["items"])
    assert out[-1] == state["items"][-1]


def _w5_build(quick: bool) -> dict[str, Any]:
    # --quick: 16 MiB; the pickling baseline alone took 14 s of a 3-minute
    # budget with 32 MiB (ablate --quick, W5: 2.5 s warm-up + 5 x 1.4 s).
    mib = 16 if quick else 100
    array = np.random.default_rng(0).random(mib * 1024 * 1024 // 8)
    return {"array": array, "n_slices": 64}


def _w5_body(state: dict[str, Any], mapper: Callable[..., list[Any]]) -> None:
    n_slices = state["n_slices"]
    out = mapper(slice_sum, range(n_slices), state["array"], n_slices)
    assert len(out) == n_slices


def _w6_build(quick: bool) -> dict[str, Any]:
    return {"items": list(range(5))}


def _w6_body(state: dict[str, Any], mapper: Callable[..., list[Any]]) -> None:
    mapper(busy_ms, state["items"], 1.0)


def _w7_build(quick: bool) -> dict[str, Any]:
    return {"maps": 20, "items": list(range(10))}


def _w7_body(state: dict[str, Any], mapper: Callable[..., list[Any]]) -> None:
    for _ in range(state["maps"]):
        mapper(identity, state["items"])


def generic_workloads() -> list[Workload]:
    """W4-W7: the engine-only workloads."""
    return [
        Workload(
            "W4", "10,000 trivial tasks", GENERIC, "ce-default", _w4_build, _w4_body
        ),
        Workload(
            "W5",
            "large array read by tasks",
            GENERIC,
            "ce-default",
            _w5_build,
            _w5_body,
        ),
        Workload("W6", "tiny: 5 items of 1 ms", GENERIC, "loop", _w6_build, _w6_body),
        Workload(
            "W7", "20 warm maps of 10 items", GENERIC, "loop", _w7_build, _w7_body
        ),
    ]


def ce_installed() -> bool:
    """Return True when calibrated-explanations and scikit-learn are importable."""
    return all(
        importlib.util.find_spec(name)
        for name in ("calibrated_explanations", "sklearn")
    )
