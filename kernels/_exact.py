"""Numpy-exact scalar arithmetic shared by the kernel cores.

The kernels must reproduce calibrated-explanations' numpy calls bit for bit,
so these helpers copy numpy's own algorithms rather than the textbook ones:

- ``np.add.reduce`` on a contiguous float64 vector starts from the identity
  ``0.0`` and adds numpy's pairwise sum (8 accumulators per block of at most
  128 values, halves split at a multiple of 8). A plain left-to-right sum
  differs in the last bit for 14 % of random triples (CE-PLUGIN-NOTES.md 5).
- ``np.percentile(..., method="linear")`` computes ``(n - 1) * q``, floors
  it, and interpolates with ``_lerp``, which switches formula at ``t = 0.5``
  and clamps the last index to ``-1``.
- ``np.searchsorted`` and ``np.digitize(..., right=True)`` on ascending bins.

Each helper is verified against numpy itself in ``tests/kernels``.
"""

from __future__ import annotations

import numpy as np

from ._jit import njit

__all__ = [
    "PAIRWISE_BLOCK",
    "np_mean",
    "np_sum",
    "percentile_sorted",
    "searchsorted_left",
    "searchsorted_right",
    "stable_argsort",
]

# numpy/_core/src/umath/loops_utils.h.src: PW_BLOCKSIZE.
PAIRWISE_BLOCK = 128


@njit
def _block_sum(a, start, n):  # type: ignore[no-untyped-def]
    """numpy's pairwise sum of at most PAIRWISE_BLOCK values."""
    if n < 8:
        res = -0.0
        for i in range(n):
            res += a[start + i]
        return res
    r0 = a[start]
    r1 = a[start + 1]
    r2 = a[start + 2]
    r3 = a[start + 3]
    r4 = a[start + 4]
    r5 = a[start + 5]
    r6 = a[start + 6]
    r7 = a[start + 7]
    i = 8
    stop = n - (n % 8)
    while i < stop:
        r0 += a[start + i]
        r1 += a[start + i + 1]
        r2 += a[start + i + 2]
        r3 += a[start + i + 3]
        r4 += a[start + i + 4]
        r5 += a[start + i + 5]
        r6 += a[start + i + 6]
        r7 += a[start + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[start + i]
        i += 1
    return res


@njit
def _pairwise_sum(a, start, n):  # type: ignore[no-untyped-def]
    """numpy's DOUBLE_pairwise_sum over a[start:start + n].

    numpy recurses on halves split at a multiple of 8; numba cannot cache a
    recursive function (it segfaults on reload), so the recursion runs on an
    explicit post-order stack instead.
    """
    if n <= PAIRWISE_BLOCK:
        return _block_sum(a, start, n)
    depth = 2
    size = n
    while size > PAIRWISE_BLOCK:
        size //= 2
        depth += 1
    starts = np.empty(depth, dtype=np.int64)
    sizes = np.empty(depth, dtype=np.int64)
    phases = np.zeros(depth, dtype=np.int64)
    partial = np.empty(depth + 1, dtype=np.float64)
    top = 0
    starts[0] = start
    sizes[0] = n
    n_partial = 0
    while top >= 0:
        s = starts[top]
        m = sizes[top]
        if m <= PAIRWISE_BLOCK:
            partial[n_partial] = _block_sum(a, s, m)
            n_partial += 1
            top -= 1
            continue
        half = m // 2
        half -= half % 8
        if phases[top] == 0:
            phases[top] = 1
            top += 1
            starts[top], sizes[top], phases[top] = s, half, 0
        elif phases[top] == 1:
            phases[top] = 2
            top += 1
            starts[top], sizes[top], phases[top] = s + half, m - half, 0
        else:
            n_partial -= 1
            partial[n_partial - 1] = partial[n_partial - 1] + partial[n_partial]
            top -= 1
    return partial[0]


@njit
def np_sum(a, start, n):  # type: ignore[no-untyped-def]
    """``np.add.reduce(a[start:start + n])`` for a contiguous float64 vector."""
    return 0.0 + _pairwise_sum(a, start, n)


@njit
def np_mean(a, start, n):  # type: ignore[no-untyped-def]
    """``np.mean(a[start:start + n])``; ``n`` must be at least 1."""
    return np_sum(a, start, n) / n


@njit
def searchsorted_left(a, start, stop, value):  # type: ignore[no-untyped-def]
    """First index k in [start, stop) with a[k] >= value (stop if none)."""
    lo = start
    hi = stop
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit
def searchsorted_right(a, start, stop, value):  # type: ignore[no-untyped-def]
    """First index k in [start, stop) with a[k] > value (stop if none)."""
    lo = start
    hi = stop
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] <= value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit
def percentile_sorted(a, start, stop, q):  # type: ignore[no-untyped-def]
    """``np.percentile(a[start:stop], 100 * q)`` for an ascending slice.

    ``q`` is the fraction numpy computes as ``np.true_divide(percent, 100)``;
    the slice must be non-empty.
    """
    n = stop - start
    virtual = (n - 1) * q
    if virtual >= n - 1:
        # numpy sets both neighbours to index -1 and gamma to virtual - (-1).
        lower = a[stop - 1]
        upper = lower
        gamma = virtual + 1.0
    else:
        previous = np.floor(virtual)
        gamma = virtual - previous
        k = start + int(previous)
        lower = a[k]
        upper = a[k + 1]
    diff = upper - lower
    if gamma >= 0.5:
        return upper - diff * (1.0 - gamma)
    return lower + diff * gamma


@njit
def stable_argsort(keys):  # type: ignore[no-untyped-def]
    """``np.argsort(keys, kind="stable")`` for a float64 vector (NaN-free).

    A bottom-up merge sort: numba's own mergesort takes seconds to compile
    for every caller, this takes a fraction of that.
    """
    n = keys.shape[0]
    order = np.arange(n)
    buffer = np.empty(n, dtype=order.dtype)
    width = 1
    while width < n:
        for left in range(0, n, 2 * width):
            middle = min(left + width, n)
            right = min(left + 2 * width, n)
            i = left
            j = middle
            k = left
            while i < middle and j < right:
                # Take from the right run only when strictly smaller: stable.
                if keys[order[j]] < keys[order[i]]:
                    buffer[k] = order[j]
                    j += 1
                else:
                    buffer[k] = order[i]
                    i += 1
                k += 1
            while i < middle:
                buffer[k] = order[i]
                i += 1
                k += 1
            while j < right:
                buffer[k] = order[j]
                j += 1
                k += 1
        order, buffer = buffer, order
        width *= 2
    return order
