"""Chunking, running a chunk, and ordered reassembly."""

from __future__ import annotations

import itertools
import random

import pytest

from engine import CancelledError
from engine._chunks import OrderedBuffer, default_chunk_size, make_chunks, run_chunk
from engine._state import is_nested


@pytest.mark.parametrize("n_items", [0, 1, 7, 8, 9, 100])
@pytest.mark.parametrize("size", [1, 3, 8, 1000])
def test_chunks_cover_items_in_order(n_items: int, size: int) -> None:
    items = list(range(n_items))
    for source in (items, iter(items)):
        chunks = list(make_chunks(source, size))
        assert [c.index for c in chunks] == list(range(len(chunks)))
        flat = [x for c in chunks for x in c.items]
        assert flat == items
        for chunk in chunks:
            assert list(chunk.items) == items[chunk.start : chunk.start + len(chunk)]
            assert 1 <= len(chunk) <= size


def test_bad_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_size=0"):
        list(make_chunks([1], 0))


@pytest.mark.parametrize(
    ("n_items", "workers", "expected"), [(0, 2, 1), (1, 2, 1), (100, 2, 13), (8, 4, 1)]
)
def test_default_chunk_size(n_items: int, workers: int, expected: int) -> None:
    assert default_chunk_size(n_items, workers) == expected


def test_run_chunk_results_and_time() -> None:
    results, seconds = run_chunk(lambda x, y: x + y, [1, 2, 3], (10,))
    assert results == [11, 12, 13]
    assert seconds >= 0


def test_run_chunk_marks_worker_only_when_asked() -> None:
    inside, _ = run_chunk(lambda _: is_nested(), [0], (), as_worker=True)
    outside, _ = run_chunk(lambda _: is_nested(), [0], (), as_worker=False)
    assert inside == [True]
    assert outside == [False]


def test_run_chunk_checks_cancel_between_items() -> None:
    calls = []

    def fn(x: int) -> int:
        calls.append(x)
        return x

    with pytest.raises(CancelledError):
        run_chunk(fn, [1, 2, 3], (), is_cancelled=lambda: len(calls) >= 2)
    assert calls == [1, 2]


def test_ordered_buffer_releases_in_order() -> None:
    order = list(range(50))
    random.Random(4).shuffle(order)
    buffer = OrderedBuffer()
    released = []
    for index in order:
        buffer.put(index, index * 2)
        released.extend(buffer.pop_ready())
    assert released == [i * 2 for i in range(50)]
    assert len(buffer) == 0
    assert buffer.next_index == 50


def test_ordered_buffer_refuses_duplicates() -> None:
    buffer = OrderedBuffer()
    buffer.put(0, "a")
    list(buffer.pop_ready())
    with pytest.raises(RuntimeError, match="twice"):
        buffer.put(0, "b")


def _adaptive(
    n_items: int, per_item_s: float, workers: int = 2, initial: int = 4
) -> list[int]:
    from engine._chunks import AdaptiveChunks

    done = {"items": 0}

    def measured() -> tuple[int, float]:
        return done["items"], done["items"] * per_item_s

    chunks = AdaptiveChunks(
        list(range(n_items)),
        workers=workers,
        initial_size=initial,
        target_chunk_s=0.02,
        measured=measured,
    )
    flat = []
    for chunk in chunks:
        flat.extend(chunk.items)
        done["items"] += len(chunk)  # as if each chunk finished before the next
    assert flat == list(range(n_items))
    return chunks.sizes


def test_adaptive_chunks_grow_when_fast() -> None:
    sizes = _adaptive(100_000, per_item_s=1e-6)
    assert sizes[1] > sizes[0]  # grew after the first measurement
    assert all(b <= a * 4 for a, b in itertools.pairwise(sizes))  # bounded growth
    assert len(sizes) < 20  # trivial items are not split into many chunks


def test_adaptive_chunks_shrink_at_the_end() -> None:
    sizes = _adaptive(2_000, per_item_s=1e-3, initial=20)  # 20 items fill the target
    assert max(sizes) == 20
    assert sizes[-1] < max(sizes)  # shrank towards the end
    assert min(sizes) >= 20 // 8  # but not below the floor


def test_adaptive_chunks_aim_at_target_duration() -> None:
    sizes = _adaptive(2_000, per_item_s=0.01, initial=1)  # 10 ms items: 2 per chunk
    assert max(sizes) == 2


@pytest.mark.parametrize("n_items", [0, 1, 5, 97])
def test_adaptive_chunks_cover_everything(n_items: int) -> None:
    _adaptive(n_items, per_item_s=1e-4)
