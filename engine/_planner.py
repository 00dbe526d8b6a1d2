"""What auto measures for one executor, and its call to ``auto.choose``.

``engine.auto`` is a pure function of an estimate; this module makes the
estimate. For each ``ParallelExecutor``, an :class:`AutoPlanner` keeps

- the serial probe: the first items of a map run in the caller (their
  results are kept) until their cost is known;
- each function's measured cost per item, so that the next maps of the same
  function skip the probe (for ``REPROBE_EVERY`` maps, then probe again);
- the gains forgone by running serially while a pool was cold
  (``auto.choose_amortised``).

Pool start-ups measured in this process are kept per strategy and start
method in :data:`STARTUP_S` (one process-wide table).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import pickle
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, final

from engine import strategies
from engine._chunks import call_into
from engine._context import usable_cpu_count
from engine.auto import (
    DEFAULT_ORDER,
    DEFAULT_STARTUP_S,
    MIN_PARALLEL_WORK_S,
    Estimate,
    Split,
    choose_amortised,
    split_tiny,
)
from engine.config import ParallelConfig

__all__ = [
    "NO_ITEM",
    "STARTUP_S",
    "AutoPlanner",
    "Plan",
    "ran_in_caller",
    "releases_gil",
]

# auto's serial probe: at most this many leading items, stopping once this
# much time is spent; their results are kept (W6: 5 items of 1 ms stay serial).
PROBE_MAX_ITEMS: Final = 3
PROBE_BUDGET_S: Final = 0.05
# ...but no projection is trusted from less measured work than this: three
# trivial items take ~1 us, so one interrupt or cache miss (10 us) projected
# W4's 10,000 items to 33 ms, over MIN_PARALLEL_WORK_S, and auto ran them as
# chunks on the serial strategy at 1.10-1.13x its time (ablate --quick, W4,
# 3 runs of 6) instead of one loop at 0.30-0.35x.
PROBE_MIN_S: Final = 0.001
# The probe never takes more than this share of a map it can stop on (its
# projection trusted and over MIN_PARALLEL_WORK_S): W1-W2's maps are 3 items
# of 17-40 ms, and the probe's 3 items were the whole map, run in the caller
# at 1.2-1.5x a warm pool's time (engine ablate W1, W2, one map in nine).
PROBE_SHARE: Final = 1 / 3
# A function's cost per item is reused by this many later maps, then probed
# again (its items may have changed). Every auto map that finishes with at
# least PROBE_MIN_S of measured work refreshes the cost, from the workers'
# own clocks when a pool ran it, so a warm pool is not re-probed serially.
REPROBE_EVERY: Final = 8
# The cost in use is the lower median of the last this-many measurements:
# one slow map (descheduled, a GC pass) measured 4x W6's cost per item, and
# the next map, taken for 20 ms of work, ran as serial chunks instead of one
# loop in the caller (ablate W6, 1 map in 125). A real change shows after
# two maps.
COST_HISTORY: Final = 3

# A function whose split maps (AutoPlanner.split) ran slower than one loop
# in the caller would have is not split for its next SPLIT_RETRY_AFTER maps,
# twice as many after each such verdict in a row (at most SPLIT_RETRY_MAX):
# the full ablation's W5 (64 slices of a 100 MiB shared array) split in
# 10.8 ms against 7.4 ms in one loop, the workers taking twice the caller's
# time per slice. "Slower" is the lower median of the last SPLIT_HISTORY
# splits' wall / loop, once SPLIT_JUDGED_MIN are known since the last
# verdict, not counting the first split after a pause (its worker idled:
# 6.1-8.0 ms where W6's splits take 3.7-4.2). W6's splits took 0.70x the
# loop (median), yet 7 of 121 took longer, in bursts, when other executors'
# maps ran between them (ci/bench/share.py's rotation); a burst of 4-7
# slow ones in the full ablation paused them, and a pause of 32 maps kept
# W6 in the caller for 75 of its 125 timed maps, so pauses start short.
SPLIT_HISTORY: Final = 5
SPLIT_JUDGED_MIN: Final = 3
SPLIT_RETRY_AFTER: Final = 8
SPLIT_RETRY_MAX: Final = 1024

# Pool start-up seconds measured in this process, per strategy and configured
# start method (None: the platform default), auto's input; the executor
# writes it (engine._planner.STARTUP_S) when it starts a pool.
STARTUP_S: dict[tuple[str, str | None], float] = {}

NO_ITEM: Final = object()


class Plan(NamedTuple):
    """What a map runs on, and why."""

    strategy: str
    workers: int
    chunk_size: int | None
    reason: str
    nested: bool


def releases_gil(fn: Callable[..., Any]) -> bool:
    """Return True if ``fn`` is known to release the GIL.

    True for numba dispatchers compiled with ``nogil=True`` and for callables
    marked ``fn.releases_gil = True``; ``functools.partial`` is unwrapped.
    """
    while hasattr(fn, "func") and hasattr(fn, "args"):
        fn = fn.func
    if getattr(fn, "releases_gil", False) is True:
        return True
    options = getattr(fn, "targetoptions", None)
    return isinstance(options, dict) and bool(options.get("nogil"))


def _pickled_size(item: Any) -> int | None:
    try:
        return len(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # unpicklable here; the strategy will say so if it matters
        return None


# How the reason of every map auto ran in one loop in the caller ends.
RAN_IN_CALLER: Final = "ran in the caller"


@functools.lru_cache(maxsize=256)
def ran_in_caller(work_s: float, source: str) -> str:
    """auto's reason for a map it ran in the caller, with ``work_s`` of work.

    Cached: a known cost repeats for ``REPROBE_EVERY`` maps, and formatting
    two floats right after a map's items cost W6 about 20 us (cold caches).
    """
    return (
        f"{work_s * 1e3:.2f} ms of work{source} "
        f"< {MIN_PARALLEL_WORK_S * 1e3:.0f} ms: {RAN_IN_CALLER}"
    )


def _lower_median(values: collections.deque[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@final
class _Splits:
    """Whether a function's split maps pay: their last wall / loop ratios."""

    __slots__ = ("paused", "ratios", "resumed", "retry_after")

    def __init__(self) -> None:
        self.ratios: collections.deque[float] = collections.deque(maxlen=SPLIT_HISTORY)
        self.paused = 0  # maps left before a split is tried again
        self.retry_after = SPLIT_RETRY_AFTER  # the next verdict's pause
        self.resumed = False  # the next split is the first after a pause

    def skip(self) -> bool:
        """True while paused (counting the map down)."""
        if not self.paused:
            return False
        self.paused -= 1
        return True

    def judge(self, ratio: float) -> None:
        """Add a split's wall / loop; pause when the splits do not pay."""
        if self.resumed:  # the first split after a pause: not judged
            self.resumed = False
            return
        self.ratios.append(ratio)
        if len(self.ratios) < SPLIT_JUDGED_MIN:
            return
        if _lower_median(self.ratios) <= 1.0:
            self.retry_after = SPLIT_RETRY_AFTER
            return
        self.paused = self.retry_after
        self.retry_after = min(2 * self.retry_after, SPLIT_RETRY_MAX)
        self.ratios.clear()  # judged afresh after the pause
        self.resumed = True


@final
class _Cost:
    """A function's cost per item, from its last measurements."""

    __slots__ = ("recent", "splits", "uses", "value")

    def __init__(self, first: float) -> None:
        self.recent = collections.deque([first], maxlen=COST_HISTORY)
        self.value = first
        self.uses = 0  # maps that reused it since the last measurement
        self.splits = _Splits()

    def add(self, cost: float) -> None:
        self.recent.append(cost)
        self.value = _lower_median(self.recent)
        self.uses = 0


@final
class AutoPlanner:
    """auto's measurements for one executor (thread-safe)."""

    def __init__(self, config: ParallelConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._forgone_s = 0.0
        self._item_costs: weakref.WeakKeyDictionary[Any, _Cost] = (
            weakref.WeakKeyDictionary()
        )

    def probe(
        self,
        fn: Callable[..., Any],
        items: Sequence[Any],
        local_args: tuple[Any, ...],
        n_items: int,
    ) -> tuple[list[Any], float]:
        """Run the first items in the caller; return their results and cost each.

        Past the probe, keep going in the caller while the whole map projects
        to less work than any pool could save (W6, W7), in doubling batches so
        the clock is read log(n) times (W4).
        """
        probe: list[Any] = []
        started = time.perf_counter()
        batch = 1
        enough = min(PROBE_MAX_ITEMS, max(1, int(n_items * PROBE_SHARE)))
        while len(probe) < n_items:
            done = len(probe)
            call_into(probe, fn, items[done : done + batch], local_args)
            elapsed = time.perf_counter() - started
            if len(probe) >= enough or elapsed >= PROBE_BUDGET_S:
                projected = elapsed / len(probe) * n_items
                if elapsed >= PROBE_MIN_S and projected >= MIN_PARALLEL_WORK_S:
                    break
                batch = len(probe)
        item_cost_s = (time.perf_counter() - started) / len(probe)
        with self._lock, contextlib.suppress(TypeError):  # builtins: no weakref
            self._item_costs[fn] = _Cost(item_cost_s)  # a probe starts afresh
        return probe, item_cost_s

    def observed(self, fn: Callable[..., Any], items: int, compute_s: float) -> None:
        """Refresh ``fn``'s cost per item from a map that finished.

        ``compute_s`` is the items' own time (the workers' clocks for a
        pool), so the cost stays fresh without another serial probe; the
        cost used is the lower median of the last ``COST_HISTORY``. Less
        than ``PROBE_MIN_S`` of work is not trusted: the cost then ages as
        before and is probed again after ``REPROBE_EVERY`` maps.
        """
        if items <= 0 or compute_s < PROBE_MIN_S:
            return
        with self._lock, contextlib.suppress(TypeError):  # builtins: no weakref
            entry = self._item_costs.get(fn)
            if entry is None:
                self._item_costs[fn] = _Cost(compute_s / items)
            else:
                entry.add(compute_s / items)

    def known_cost(
        self, fn: Callable[..., Any], n_items: int | None, items: Any
    ) -> float | None:
        """``fn``'s cost per item from earlier maps, while still fresh."""
        if not n_items or not isinstance(items, Sequence):
            return None
        with self._lock:
            try:
                entry = self._item_costs.get(fn)
            except TypeError:  # not weak-referenceable (builtins)
                return None
            if entry is None or entry.uses >= REPROBE_EVERY:
                return None
            entry.uses += 1
            return entry.value

    def split(
        self,
        fn: Callable[..., Any],
        n_items: int,
        item_cost_s: float,
        item: Any,
        *,
        warm: bool,
        workers: int,
    ) -> tuple[Split, str] | None:
        """Whether a map of ``fn`` under MIN_PARALLEL_WORK_S shares the pool.

        With the pool warm: whenever ``auto.split_tiny`` says it pays, unless
        ``fn``'s last split maps did not (``split_done``). With it cold
        (``warm`` False): the gain each such map forgoes is added up (with
        ``choose``'s), and the pool is started once the gains reach its
        start-up cost, the rule ``auto.choose_amortised`` applies to bigger
        maps. Returns the split and its reason, or ``None``: one loop in the
        caller.
        """
        cfg = self._config
        if "processes" not in (cfg.prefer or DEFAULT_ORDER):
            return None
        with self._lock, contextlib.suppress(TypeError):  # builtins: no weakref
            entry = self._item_costs.get(fn)
            if entry is not None and entry.splits.skip():
                return None
        split = split_tiny(
            n_items,
            item_cost_s,
            workers=workers,
            usable_cpus=usable_cpu_count(),
            task_bytes=self._task_bytes(item),
        )
        if split is None:
            return None
        serial_s = n_items * item_cost_s
        paid = ""
        if not warm:
            start = STARTUP_S.get(("processes", cfg.start_method))
            if start is None:
                start = DEFAULT_STARTUP_S["processes"]
            with self._lock:
                self._forgone_s += serial_s - split.predicted_s
                forgone_s = self._forgone_s
            if forgone_s < start:
                return None
            paid = (
                f"; its {start:.3f}s start-up is paid off by {forgone_s:.3f}s "
                "forgone in caller runs"
            )
        return split, (
            f"{serial_s * 1e3:.2f} ms of work (known cost): the caller ran "
            f"{split.caller_items} items while the process pool ran "
            f"{n_items - split.caller_items} (predicted {split.predicted_s * 1e3:.2f} ms)"
            f"{paid}"
        )

    def split_done(self, fn: Callable[..., Any], wall_s: float, loop_s: float) -> None:
        """Judge a split map of ``fn`` (warm pool): ``wall_s`` against the
        ``loop_s`` one loop in the caller would have taken (from the caller's
        share). Once ``SPLIT_JUDGED_MIN`` are known, a lower median of the
        last ``SPLIT_HISTORY`` over 1 stops ``fn``'s splits for a pause that
        doubles with each verdict in a row; a median of 1 or less resets it.
        The first split after a pause is not judged (its worker idled).
        """
        with self._lock, contextlib.suppress(TypeError):  # builtins: no weakref
            entry = self._item_costs.get(fn)
            if entry is not None and loop_s > 0:
                entry.splits.judge(wall_s / loop_s)

    def _task_bytes(self, item: Any) -> int | None:
        """Bytes pickled per task: the configured hint, else ``item``'s size."""
        hint = self._config.task_size_hint_bytes
        if hint is None and item is not NO_ITEM:
            return _pickled_size(item)
        return hint

    def choose(
        self,
        fn: Callable[..., Any],
        n_items: int | None,
        item_cost_s: float | None,
        item: Any,
        *,
        warm: set[str],
        shared_bytes: int,
    ) -> Plan:
        """Ask ``auto`` with what was measured; ``warm``: pools already started."""
        cfg = self._config
        available = tuple(
            name for name in strategies.available_strategies() if name != "dask"
        )
        # Measured start-ups of this executor's start method; strategies never
        # started in this process keep auto's defaults (a cold default-method
        # pool took 2.6 s; assuming 0 made auto start one for 75 ms of work).
        startup: dict[str, float | None] = {
            name: STARTUP_S.get((name, cfg.start_method)) for name in available
        }
        startup.update(dict.fromkeys(warm, 0.0))
        with self._lock:
            forgone_before = self._forgone_s
        choice, forgone_s = choose_amortised(
            Estimate(
                n_items=n_items,
                usable_cpus=usable_cpu_count(),
                max_workers=cfg.max_workers,
                available=available,
                prefer=cfg.prefer,
                releases_gil=releases_gil(fn),
                item_cost_s=item_cost_s,
                task_bytes=self._task_bytes(item),
                shared_bytes=shared_bytes,
                startup_s={k: v for k, v in startup.items() if v is not None},
            ),
            forgone_before,
        )
        with self._lock:
            self._forgone_s += forgone_s
        return Plan(
            choice.strategy, choice.max_workers, choice.chunk_size, choice.reason, False
        )
