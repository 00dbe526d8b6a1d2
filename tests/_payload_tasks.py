"""Payload test scenarios, each run in its own interpreter by the tests.

A scenario creates a ``PayloadStore``, starts plain ``multiprocessing``
children (fork or spawn) that attach its payloads, and prints one JSON object
as its last stdout line. The tests run it with ``python -c`` so that they can
assert on everything printed at interpreter exit, the resource tracker's
warnings included (gh-82300), and check that no ``/dev/shm`` segment remains.

Usage: ``python -c "import _payload_tasks as t; t.main()" SCENARIO METHOD``
with ``tests/`` and the repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

import functools
import json
import mmap
import multiprocessing
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engine import payload
from engine.errors import PayloadError
from engine.forksafe import LRUCache, register_fork_reset

SHM_DIR = "/dev/shm"
UNPICKLES = 0  # CountingModel rebuilds in this process


class CountingModel:
    """A 'fitted model' that counts how often it is unpickled per process."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_counting, (self.weights,))


def _rebuild_counting(weights: np.ndarray) -> CountingModel:
    global UNPICKLES
    UNPICKLES += 1
    return CountingModel(weights)


def predict(model: CountingModel, x: float) -> float:
    return float(model.weights.sum() * x)


def make_closure(array: np.ndarray) -> Callable[[], np.ndarray]:
    def get() -> np.ndarray:
        return array

    return get


def dtype_cases() -> dict[str, np.ndarray]:
    """One array per dtype family the store must carry bit for bit."""
    rng = np.random.default_rng(0)
    cases: dict[str, np.ndarray] = {
        "bool": rng.random(37) > 0.5,
        "float16": rng.random(11).astype(np.float16),
        "float32": rng.random(11).astype(np.float32),
        "float64_nan": np.array([0.5, np.nan, -np.inf, np.inf, -0.0]),
        "longdouble": rng.random(5).astype(np.longdouble),
        "complex64": (rng.random(6) + 1j * rng.random(6)).astype(np.complex64),
        "complex128": rng.random(6) + 1j * rng.random(6),
        "clongdouble": (rng.random(3) + 1j).astype(np.clongdouble),
        "datetime64_ns": np.array(["2024-02-29T12:00:00.123456789", "NaT"], "M8[ns]"),
        "datetime64_D": np.arange("2000-01-01", "2000-01-09", dtype="M8[D]"),
        "timedelta64_ms": np.array([1, -5, 0], dtype="m8[ms]"),
        "big_endian_i4": np.arange(9, dtype=">i4"),
        "bytes_S5": np.array([b"ab", b"cdefg"], dtype="S5"),
        "unicode_U3": np.array(["xyz", "é"], dtype="U3"),
        "fortran_2d": np.asfortranarray(rng.random((7, 5))),
        "non_contiguous": np.arange(60.0).reshape(6, 10)[::2, 1::3],
        "empty_2d": np.empty((0, 3)),
        "zero_d": np.array(2.5),
        "structured_aligned": np.zeros(
            4,
            dtype=np.dtype([("a", "<i4"), ("b", "<f8", (2,)), ("c", "?")], align=True),
        ),
        "structured_nested": np.zeros(
            3, dtype=[("p", [("x", "<f4"), ("y", "<u2")]), ("t", "M8[s]")]
        ),
        "object": np.array([1, "two", None, (3,)], dtype=object),
    }
    for bits in (8, 16, 32, 64):
        cases[f"int{bits}"] = rng.integers(-100, 100, 9).astype(f"int{bits}")
        cases[f"uint{bits}"] = rng.integers(0, 200, 9).astype(f"uint{bits}")
    cases["structured_aligned"]["a"] = [1, -2, 3, -4]
    cases["structured_aligned"]["b"] = rng.random((4, 2))
    cases["structured_aligned"]["c"] = [True, False, True, True]
    cases["structured_nested"]["p"]["x"] = [1.5, 2.5, -3.5]
    cases["structured_nested"]["t"] = np.array(["2001-01-01T00:00:01"] * 3, "M8[s]")
    return cases


def describe(value: Any) -> dict[str, Any]:
    """What must survive the trip: dtype, shape, layout and every byte."""
    if value.dtype.hasobject:
        return {
            "dtype": "object",
            "shape": list(value.shape),
            "items": repr(value.tolist()),
        }
    return {
        "dtype": repr(np.lib.format.dtype_to_descr(value.dtype)),
        "shape": list(value.shape),
        "f_only": bool(value.flags.f_contiguous and not value.flags.c_contiguous),
        "bytes": value.tobytes(order="A").hex(),
    }


def _mapped_from(address: int, name: str) -> bool:
    """Linux: is ``address`` inside this process's mapping of the segment?"""
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().startswith(f"{SHM_DIR}/{name}"):
                start, end = (int(part, 16) for part in fields[0].split("-"))
                if start <= address < end:
                    return True
    return False


# -- children -----------------------------------------------------------------


def child_zero_copy(conn: Any, blob: bytes, ref: payload.PayloadRef) -> None:
    get = payload.loads(blob)
    view = payload.attach(ref)
    (again,) = payload.resolve((ref,))
    report: dict[str, Any] = {
        "same_object": again is view and get() is view,
        "shares_second_attach": bool(np.shares_memory(view, again)),
        "writeable": bool(view.flags.writeable),
        "first": float(view[0]),
    }
    if sys.platform.startswith("linux"):
        report["in_segment"] = _mapped_from(
            view.__array_interface__["data"][0], ref.name
        )
    try:
        view[0] = -1.0
        report["write"] = "allowed"
    except ValueError:
        report["write"] = "ValueError"
    try:
        view.flags.writeable = True
        report["flag"] = "flipped"
    except ValueError:
        report["flag"] = "ValueError"
    conn.send(report)
    conn.recv()  # the owner has written 42.0 into the segment
    conn.send(float(view[0]))
    del view, again, get
    payload.detach_all()


def child_describe(conn: Any, refs: dict[str, payload.PayloadRef], blob: bytes) -> None:
    by_ref = {name: describe(payload.attach(ref)) for name, ref in refs.items()}
    loaded = payload.loads(blob)
    by_dumps = {name: describe(value) for name, value in loaded.items()}
    readonly = all(
        not payload.attach(ref).flags.writeable
        for ref in refs.values()
        if ref.kind == "array"
    )
    conn.send({"by_ref": by_ref, "by_dumps": by_dumps, "readonly": readonly})


def child_unpickle_once(conn: Any, ref: payload.PayloadRef, blobs: list[bytes]) -> None:
    first = payload.attach(ref)
    second = payload.attach(ref)
    (third,) = payload.resolve((ref,))
    tasks = [payload.loads(blob) for blob in blobs]
    results = [task() for task in tasks]
    same = first is second is third and all(task.args[0] is first for task in tasks)
    conn.send({"unpickles": UNPICKLES, "same": same, "results": results})


def child_loads_sum(conn: Any, blob: bytes, ref: payload.PayloadRef) -> None:
    get = payload.loads(blob)
    conn.send([float(get().sum()), payload.attach(ref)])


def child_attach_and_hang(conn: Any, ref: payload.PayloadRef) -> None:
    conn.send(float(payload.attach(ref).sum()))
    time.sleep(60)


def child_sum(conn: Any, ref: payload.PayloadRef) -> None:
    try:
        conn.send(float(payload.attach(ref).sum()))
    except PayloadError as exc:
        conn.send(f"PayloadError: {exc}")


def child_wait_then_sum(conn: Any) -> None:
    ref = conn.recv()
    conn.send(float(payload.attach(ref).sum()))


def child_unlink(conn: Any, name: str) -> None:
    conn.send([payload.unlink_segment(name), payload.unlink_segment(name)])


_RESET_CALLS: list[str] = []


def _note_reset() -> None:
    _RESET_CALLS.append("reset")


def child_after_fork(
    conn: Any, store: payload.PayloadStore, cache: LRUCache, ref: Any
) -> None:
    report = {
        "owned": list(store.segment_names()),
        "cache_len": len(cache),
        "cache_has_k": "k" in cache,
        "callable_reset": list(_RESET_CALLS),
        "attach_sum": float(payload.attach(ref).sum()),
        "local_sum": float(store.local(ref).sum()),
    }
    own = store.share(np.ones(10))
    report["own_segment"] = own.name
    report["own_pid_ok"] = int(own.name.split("_")[1], 36) == os.getpid()
    store.close()  # unlinks the child's own segment only
    report["own_gone"] = not os.path.exists(os.path.join(SHM_DIR, own.name))
    conn.send(report)


# -- scenarios (run in their own interpreter) ---------------------------------


def _run_child(ctx: Any, target: Callable[..., None], *args: Any) -> Any:
    parent_end, child_end = ctx.Pipe()
    process = ctx.Process(target=target, args=(child_end, *args))
    process.start()
    child_end.close()
    reply = parent_end.recv()
    process.join(30)
    return reply, process.exitcode


def _run_children(ctx: Any, count: int, target: Callable[..., None], *args: Any) -> Any:
    """Run ``count`` children at once, like a pool's workers."""
    started = []
    for _ in range(count):
        parent_end, child_end = ctx.Pipe()
        process = ctx.Process(target=target, args=(child_end, *args))
        process.start()
        child_end.close()
        started.append((parent_end, process))
    replies = [parent_end.recv() for parent_end, _ in started]
    for _, process in started:
        process.join(30)
    return [
        (reply, process.exitcode)
        for reply, (_, process) in zip(replies, started, strict=True)
    ]


def _exists(names: Any) -> list[str]:
    return [name for name in names if os.path.exists(os.path.join(SHM_DIR, name))]


def scenario_close(method: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context(method)
    x = np.arange(1 << 20, dtype=np.float64)  # 8 MiB: shared automatically
    store = payload.PayloadStore()
    blob = store.dumps(make_closure(x))
    model_ref = store.share({"weights": [1, 2, 3]})
    reply, code = _run_child(ctx, child_loads_sum, blob, model_ref)
    names = store.segment_names()
    store.close()
    store.close()  # idempotent
    return {
        "reply": reply,
        "expected": float(x.sum()),
        "exitcode": code,
        "names": names,
        "left": _exists(names),
    }


def scenario_zero_copy_live(method: str) -> dict[str, Any]:
    """The owner writes into the segment; the child's view sees it (no copy)."""
    ctx = multiprocessing.get_context(method)
    x = np.arange(1 << 20, dtype=np.float64)
    with payload.PayloadStore() as store:
        ref = store.share(x)
        blob = store.dumps(make_closure(x))
        parent_end, child_end = ctx.Pipe()
        process = ctx.Process(target=child_zero_copy, args=(child_end, blob, ref))
        process.start()
        child_end.close()
        report = parent_end.recv()
        fd = os.open(os.path.join(SHM_DIR, ref.name), os.O_RDWR)
        try:
            with mmap.mmap(fd, mmap.PAGESIZE) as writable:
                struct.pack_into("<d", writable, 0, 42.0)
        finally:
            os.close(fd)
        parent_end.send("written")
        report["after_owner_write"] = parent_end.recv()
        process.join(30)
        report["exitcode"] = process.exitcode
        names = store.segment_names()
    report["names"] = names
    report["left"] = _exists(names)
    return report


def scenario_dtypes(method: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context(method)
    cases = dtype_cases()
    with payload.PayloadStore(threshold_bytes=0) as store:
        refs = {name: store.share(array) for name, array in cases.items()}
        other = {name: array.copy(order="K") for name, array in cases.items()}
        other["non_contiguous"] = cases["non_contiguous"][:, ::-1]  # still strided
        blob = store.dumps(other)
        reply, code = _run_child(ctx, child_describe, refs, blob)
        names = store.segment_names()
        kinds = {name: ref.kind for name, ref in refs.items()}
    expected = {name: describe(array) for name, array in cases.items()}
    expected_dumps = {name: describe(array) for name, array in other.items()}
    return {
        "kinds": kinds,
        "ref_mismatches": [n for n in cases if reply["by_ref"][n] != expected[n]],
        "dumps_mismatches": [
            n for n in other if reply["by_dumps"][n] != expected_dumps[n]
        ],
        "readonly": reply["readonly"],
        "exitcode": code,
        "left": _exists(names),
    }


def scenario_unpickle_once(method: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context(method)
    model = CountingModel(np.arange(10.0))
    with payload.PayloadStore() as store:
        ref = store.share(model)
        blobs = [
            store.dumps(functools.partial(predict, model, x)) for x in (1.0, 2.0, 3.0)
        ]
        replies = _run_children(ctx, 2, child_unpickle_once, ref, blobs)
        names = store.segment_names()
        blob_sizes = [len(blob) for blob in blobs]
    return {
        "replies": [reply for reply, _ in replies],
        "exitcodes": [code for _, code in replies],
        "parent_unpickles": UNPICKLES,
        "blob_sizes": blob_sizes,
        "left": _exists(names),
    }


def scenario_sigkill(method: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context(method)
    x = np.arange(1000.0)
    with payload.PayloadStore() as store:
        ref = store.share(x)
        parent_end, child_end = ctx.Pipe()
        process = ctx.Process(target=child_attach_and_hang, args=(child_end, ref))
        process.start()
        child_end.close()
        first = parent_end.recv()
        os.kill(process.pid, signal.SIGKILL)
        process.join(30)
        survived = _exists([ref.name])
        second, code = _run_child(ctx, child_sum, ref)
        names = store.segment_names()
    return {
        "first": first,
        "killed_exitcode": process.exitcode,
        "survived": survived,
        "second": second,
        "second_exitcode": code,
        "left": _exists(names),
    }


def scenario_fork_before_tracker(method: str) -> dict[str, Any]:
    """A child forked before the tracker ran attaches; the segment survives."""
    ctx = multiprocessing.get_context(method)
    parent_end, child_end = ctx.Pipe()
    process = ctx.Process(target=child_wait_then_sum, args=(child_end,))
    process.start()  # no segment yet: the resource tracker is not running
    child_end.close()
    with payload.PayloadStore() as store:
        ref = store.share(np.arange(100.0))
        parent_end.send(ref)
        first = parent_end.recv()
        process.join(30)
        survived = _exists([ref.name])
        second, _ = _run_child(ctx, child_sum, ref)
        names = store.segment_names()
    return {
        "first": first,
        "survived": survived,
        "second": second,
        "left": _exists(names),
    }


def scenario_unlink_by_name(method: str) -> dict[str, Any]:
    """Another process unlinks by name, as the supervisor does for a dead owner."""
    ctx = multiprocessing.get_context(method)
    with payload.PayloadStore() as store:
        ref = store.share(np.arange(100.0))
        reply, code = _run_child(ctx, child_unlink, ref.name)
        left_after_child = _exists([ref.name])
    return {"reply": reply, "exitcode": code, "left": left_after_child}


def scenario_exception(method: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context(method)
    names: tuple[str, ...] = ()
    caught = ""
    try:
        with payload.PayloadStore() as store:
            ref = store.share(np.arange(100.0))
            store.share({"model": "m"})
            _run_child(ctx, child_sum, ref)
            names = store.segment_names()
            msg = "boom"
            raise RuntimeError(msg)
    except RuntimeError as exc:
        caught = str(exc)
    return {"caught": caught, "names": names, "left": _exists(names)}


def scenario_keyboard_interrupt(method: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context(method)
    names: tuple[str, ...] = ()
    interrupted = False
    try:
        with payload.PayloadStore() as store:
            ref = store.share(np.arange(100.0))
            _run_child(ctx, child_sum, ref)
            names = store.segment_names()
            signal.raise_signal(signal.SIGINT)
            time.sleep(5)  # not reached: KeyboardInterrupt is raised above
    except KeyboardInterrupt:
        interrupted = True
    return {"interrupted": interrupted, "names": names, "left": _exists(names)}


def scenario_uncaught(method: str) -> dict[str, Any]:
    """Never closed, ends with an uncaught error: the finalizer unlinks at exit."""
    store = payload.PayloadStore()
    ref = store.share(np.arange(100.0))
    _run_child(multiprocessing.get_context(method), child_sum, ref)
    print(json.dumps({"names": store.segment_names()}), flush=True)
    msg = "uncaught on purpose"
    raise RuntimeError(msg)


def scenario_owner_killed(method: str) -> dict[str, Any]:
    """The owner dies by SIGKILL: the tracker registration unlinks its segment."""
    del method
    store = payload.PayloadStore()
    store.share(np.arange(100.0))
    print(json.dumps({"names": store.segment_names()}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def scenario_fork_reset(method: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context(method)
    register_fork_reset(_note_reset)
    cache = LRUCache(max_items=4)
    cache.put("k", np.zeros(3))
    x = np.arange(50.0)
    with payload.PayloadStore() as store:
        ref = store.share(x)
        payload.attach(ref)  # the parent's attach cache is filled too
        report, code = _run_child(ctx, child_after_fork, store, cache, ref)
        names = store.segment_names()
        report["parent_left_after_child"] = _exists(names)
        report["parent_cache_len"] = len(cache)
        report["parent_resets"] = list(_RESET_CALLS)
    report["exitcode"] = code
    report["names"] = names
    report["left"] = _exists(names)
    payload.detach_all()
    return report


def scenario_no_space(method: str) -> dict[str, Any]:
    """Run inside a private mount namespace with an 8 MiB /dev/shm."""
    del method
    out: dict[str, Any] = {"free_mib": payload._shm_free_bytes() / (1 << 20)}
    with payload.PayloadStore() as store:
        small = store.share(np.ones(1 << 17))  # 1 MiB fits
        out["small_ok"] = float(payload.attach(small).sum()) == float(1 << 17)
        payload.detach_all()
        big = np.ones(2 << 20)  # 16 MiB does not
        for label, action in (
            ("share", lambda: store.share(big)),
            ("dumps", lambda: store.dumps(make_closure(big))),
        ):
            try:
                action()
                out[label] = "no error"
            except PayloadError as exc:
                out[label] = str(exc)
        # Past the free-space check, posix_fallocate itself must fail cleanly.
        payload._shm_free_bytes = lambda: 1 << 40
        try:
            store.share(big)
            out["fallocate"] = "no error"
        except PayloadError as exc:
            out["fallocate"] = str(exc)
        out["owned"] = list(store.segment_names())
    out["left"] = sorted(n for n in os.listdir(SHM_DIR) if n.startswith(payload.PREFIX))
    return out


SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {
    name.removeprefix("scenario_"): value
    for name, value in list(globals().items())
    if name.startswith("scenario_")
}


def main() -> None:
    name, method = sys.argv[1], sys.argv[2]
    result = SCENARIOS[name](method)
    print(json.dumps(result), flush=True)
