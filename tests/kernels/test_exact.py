"""The numpy-exact helpers against numpy itself."""

from __future__ import annotations

import numpy as np
import pytest

from kernels._exact import np_mean, np_sum, percentile_sorted, stable_argsort

SIZES = [1, 2, 3, 7, 8, 9, 15, 16, 17, 127, 128, 129, 255, 256, 257, 1000, 4099]


@pytest.mark.parametrize("n", SIZES)
def test_np_sum_and_mean_match_numpy_bitwise(n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(20):
        a = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 17, n)
        expected = np.add.reduce(a)
        got = np_sum(a, 0, n)
        assert got == expected
        assert np.signbit(got) == np.signbit(expected)
        assert np_mean(a, 0, n) == np.mean(a)


def test_np_sum_of_negative_zeros_is_positive_zero_like_numpy() -> None:
    a = np.array([-0.0, -0.0, -0.0])
    assert np.signbit(np_sum(a, 0, 3)) == np.signbit(np.add.reduce(a))


def test_np_mean_on_an_offset_window() -> None:
    a = np.array([9.0, 1e16, 1.0, 1.0, 9.0])
    assert np_mean(a, 1, 3) == np.mean(a[1:4])


@pytest.mark.parametrize("q", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 10, 101])
def test_percentile_matches_numpy_bitwise(q: float, n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(20):
        a = np.sort(rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5, n))
        assert percentile_sorted(a, 0, n, q) == np.quantile(a, q)


def test_percentile_of_a_window_and_of_signed_zeros() -> None:
    a = np.array([-5.0, -0.0, -0.0, 0.0, 3.0, 8.0])
    for start, stop in [(0, 6), (1, 4), (1, 2), (2, 5)]:
        for q in (0.25, 0.5, 0.75, 1.0):
            got = percentile_sorted(a, start, stop, q)
            expected = np.quantile(a[start:stop], q)
            assert got == expected
            assert np.signbit(got) == np.signbit(expected)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 33, 100])
def test_stable_argsort_matches_numpy_stable(n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(10):
        keys = rng.choice([-np.inf, -1.0, -0.0, 0.0, 0.5, 2.0, np.inf], n)
        assert np.array_equal(stable_argsort(keys), np.argsort(keys, kind="stable"))
