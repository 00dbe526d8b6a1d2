"""PayloadStore and attach within one process: handles, views, dumps, errors.

Cross-process behaviour (fork and spawn children, SIGKILL, exit-time output)
is in test_payload_processes.py.
"""

from __future__ import annotations

import functools
import gc
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engine import payload
from engine.errors import ConfigError, PayloadError
from engine.payload import PayloadRef, PayloadStore

SHM_DIR = Path("/dev/shm")
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs a /dev/shm listing"
)


@pytest.fixture(autouse=True, scope="module")
def _tracker_running() -> None:
    # The resource tracker is a child process that lives as long as this one;
    # start it before the leak check records the children that were there.
    payload.ensure_tracker()


@pytest.fixture
def store() -> Iterator[PayloadStore]:
    with PayloadStore() as created:
        yield created
    payload.detach_all()


def _exists(name: str) -> bool:
    return (SHM_DIR / name).exists()


def make_closure(array: np.ndarray):
    def total() -> float:
        return float(array.sum())

    return total


# -- handles and names --------------------------------------------------------


def test_names_are_short_and_carry_the_creator_pid(store: PayloadStore) -> None:
    ref = store.share(np.arange(10))
    assert re.fullmatch(r"cepe_[0-9a-z]+_[0-9a-f]{12}", ref.name)
    assert len(ref.name) <= 30  # macOS: PSHMNAMLEN 31 including "/"
    assert int(ref.name.split("_")[1], 36) == os.getpid()
    assert store.segment_names() == (ref.name,)


def test_share_is_idempotent_by_identity(store: PayloadStore) -> None:
    x = np.arange(1000.0)
    ref = store.share(x)
    assert store.share(x) is ref
    assert store.share(ref) is ref
    assert store.share(x.copy()) != ref  # equal values, another object
    assert store.bytes_shared == 2 * x.nbytes
    assert len(store.segment_names()) == 2


def test_ref_pickles_as_itself_when_passed_explicitly(store: PayloadStore) -> None:
    ref = store.share(np.arange(10.0))
    assert pickle.loads(pickle.dumps(ref)) == ref
    assert len(pickle.dumps(ref)) < 300
    (loaded,) = payload.loads(store.dumps((ref,)))
    assert loaded == ref  # still a handle: resolve() turns it into a view
    (view,) = payload.resolve((loaded,))
    assert np.array_equal(view, np.arange(10.0))


# -- reading ------------------------------------------------------------------


def test_local_is_a_read_only_view_of_the_original(store: PayloadStore) -> None:
    x = np.arange(100.0)
    ref = store.share(x)
    view = store.local(ref)
    assert np.shares_memory(view, x)  # the original, not the segment copy
    assert store.local(ref) is view
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1.0
    model = {"weights": [1, 2]}
    model_ref = store.share(model)
    assert store.local(model_ref) is model
    args = store.resolve_local((ref, 3, [ref], model_ref))
    assert args[0] is view
    assert args[1:3] == (3, [ref])  # only top-level handles are replaced
    assert args[3] is model


def test_attach_is_a_cached_read_only_view_into_the_segment(
    store: PayloadStore,
) -> None:
    x = np.arange(100.0)
    ref = store.share(x)
    view = payload.attach(ref)
    assert payload.attach(ref) is view
    assert np.array_equal(view, x)
    assert not np.shares_memory(view, x)  # the segment, not the caller's array
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1.0
    with pytest.raises(ValueError, match="WRITEABLE"):
        view.flags.writeable = True


def test_local_of_a_foreign_ref_attaches() -> None:
    with PayloadStore() as one, PayloadStore() as other:
        ref = one.share(np.arange(5.0))
        assert np.array_equal(other.local(ref), np.arange(5.0))
        payload.detach(ref)


def test_object_dtype_arrays_are_pickled_not_mapped(store: PayloadStore) -> None:
    objects = np.array([1, "a", None], dtype=object)
    ref = store.share(objects)
    assert ref.kind == "object"
    assert payload.attach(ref).tolist() == [1, "a", None]


# -- automatic sharing in dumps -----------------------------------------------


def test_a_100_mib_array_in_a_closure_crosses_as_a_handle(store: PayloadStore) -> None:
    x = np.ones(100 * 1024 * 1024 // 8)
    blob = store.dumps(make_closure(x))
    assert len(blob) < 10 * 1024
    assert store.bytes_shared == x.nbytes
    again = store.dumps(functools.partial(np.add, x))  # the same array: no new segment
    assert len(again) < 10 * 1024
    assert len(store.segment_names()) == 1
    assert payload.loads(blob)() == float(x.size)


def test_dumps_finds_arrays_in_containers_partials_and_objects() -> None:
    class Model:
        def __init__(self, coef: np.ndarray) -> None:
            self.coef = coef

    big = np.arange(2048.0)  # 16 KiB
    small = np.arange(4.0)
    objects = np.empty(4096, dtype=object)
    with PayloadStore(threshold_bytes=8 * 1024) as store:
        task = {
            "nested": [(big,)],
            "partial": functools.partial(np.dot, big),
            "model": Model(big),
            "small": small,
            "objects": objects,
        }
        blob = store.dumps(task)
        assert len(store.segment_names()) == 1  # only `big`, once
        assert len(blob) < objects.nbytes  # object arrays still go by value
        loaded = payload.loads(blob)
        view = loaded["nested"][0][0]
        assert loaded["partial"].args[0] is view
        assert loaded["model"].coef is view
        assert not view.flags.writeable
        assert loaded["small"].flags.writeable  # below threshold: a copy
        del loaded, view
        payload.detach_all()


class Weights:
    def __init__(self, values: list[int]) -> None:
        self.values = values


def test_dumps_replaces_shared_objects_by_handles(store: PayloadStore) -> None:
    model = Weights(list(range(10_000)))
    ref = store.share(model)
    blob = store.dumps([model, functools.partial(len, model)])
    assert len(blob) < 1024
    first, task = payload.loads(blob)
    assert first is task.args[0] is payload.attach(ref)
    assert first.values == model.values


def test_builtin_containers_are_not_replaced_inside_dumps(store: PayloadStore) -> None:
    # pickle does not call reducer_override for exact dict/list/tuple/set/str
    # (CPython docs); such objects go by value unless passed as handles.
    config = {"weights": list(range(100))}
    store.share(config)
    (loaded,) = payload.loads(store.dumps([config]))
    assert loaded == config


# -- lifecycle and errors -----------------------------------------------------


def test_close_unlinks_and_is_idempotent() -> None:
    store = PayloadStore()
    names = [store.share(np.arange(10)).name, store.share({"k": 1}).name]
    assert all(_exists(name) for name in names)
    store.close()
    store.close()
    assert store.closed
    assert not any(_exists(name) for name in names)
    assert store.segment_names() == ()


def test_a_closed_store_refuses_work_and_its_handles_fail() -> None:
    store = PayloadStore()
    ref = store.share(np.arange(10))
    store.close()
    with pytest.raises(PayloadError, match="closed"):
        store.share(np.arange(3))
    with pytest.raises(PayloadError, match="closed"):
        store.dumps(1)
    with pytest.raises(PayloadError, match=ref.name):
        payload.attach(ref)


def test_an_unclosed_store_is_unlinked_when_collected() -> None:
    store = PayloadStore()
    name = store.share(np.arange(10)).name
    del store
    gc.collect()
    assert not _exists(name)


def test_the_store_cannot_be_pickled(store: PayloadStore) -> None:
    with pytest.raises(TypeError, match="PayloadRef"):
        pickle.dumps(store)


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_threshold_is_validated(bad: object) -> None:
    with pytest.raises(ConfigError, match="threshold_bytes"):
        PayloadStore(threshold_bytes=bad)  # type: ignore[arg-type]


@linux_only
def test_too_little_free_space_raises_and_leaves_nothing(
    store: PayloadStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(payload, "_shm_free_bytes", lambda: 4096)
    before = {p.name for p in SHM_DIR.iterdir()}
    with pytest.raises(PayloadError) as info:
        store.share(np.zeros(1 << 20))
    message = str(info.value)
    for needed in (
        "8.0 MiB (8388608 bytes)",
        "4096 bytes) free",
        "shm_threshold=",
        "shm_threshold_bytes",
        "--shm-size",
    ):
        assert needed in message
    assert {p.name for p in SHM_DIR.iterdir()} == before
    assert store.segment_names() == ()
    assert store.bytes_shared == 0


def test_detaching_while_views_live_is_quiet(store: PayloadStore) -> None:
    ref = store.share(np.arange(1000.0))
    view = payload.attach(ref)
    payload.detach_all()  # the mapping stays while `view` uses it
    assert float(view.sum()) == 499500.0
    del view
    gc.collect()  # no "Exception ignored ... BufferError" (an error in pytest here)
    assert payload.attach(ref) is not None  # attaches afresh


@linux_only
def test_sweep_orphans_removes_segments_of_dead_creators(store: PayloadStore) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    orphan = f"cepe_{payload._base36(dead_pid)}_0123456789ab"
    (SHM_DIR / orphan).write_bytes(b"x")
    live = store.share(np.arange(3)).name
    try:
        removed = payload.sweep_orphans()
    finally:
        if (SHM_DIR / orphan).exists():
            (SHM_DIR / orphan).unlink()
    assert orphan in removed
    assert live not in removed
    assert _exists(live)


def test_empty_and_fortran_arrays_keep_their_shape_and_order(
    store: PayloadStore,
) -> None:
    empty = np.empty((0, 4), dtype=np.float32)
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    empty_view = payload.attach(store.share(empty))
    fortran_ref = store.share(fortran)
    fortran_view = payload.attach(fortran_ref)
    assert (empty_view.shape, empty_view.dtype) == ((0, 4), np.float32)
    assert fortran_ref.order == "F"
    assert fortran_view.flags.f_contiguous
    assert np.array_equal(fortran_view, fortran)
    assert isinstance(fortran_ref, PayloadRef)
