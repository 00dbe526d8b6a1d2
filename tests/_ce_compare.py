"""Compare two calibrated-explanations results attribute by attribute, bitwise.

Shared by the CE identity tests (``test_ce_factual_identity.py``,
``test_ce_plugin.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _differences(a: Any, b: Any, where: str, out: list[str]) -> None:
    """Append to ``out`` every place where ``a`` and ``b`` differ (bitwise)."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
            out.append(f"{where}: keys {list(a)[:5]} != {list(b)[:5]}")
            return
        for key in a:
            _differences(a[key], b[key], f"{where}[{key!r}]", out)
        return
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or not isinstance(b, (list, tuple)):
            out.append(f"{where}: {type(a).__name__} != {type(b).__name__}")
        elif len(a) != len(b):
            out.append(f"{where}: length {len(a)} != {len(b)}")
        else:
            for k, (u, v) in enumerate(zip(a, b, strict=True)):
                _differences(u, v, f"{where}[{k}]", out)
        return
    if isinstance(a, str) or isinstance(b, str):
        if a != b:
            out.append(f"{where}: {a!r} != {b!r}")
        return
    a_array, b_array = np.asarray(a), np.asarray(b)
    if a_array.dtype == object or b_array.dtype == object:
        if not (
            a_array.shape == b_array.shape
            and all(
                _equal_scalar(u, v)
                for u, v in zip(a_array.flat, b_array.flat, strict=True)
            )
        ):
            out.append(f"{where}: {a!r} != {b!r}")
        return
    if a_array.shape != b_array.shape:
        out.append(f"{where}: shape {a_array.shape} != {b_array.shape}")
    elif not np.array_equal(a_array, b_array):
        gap = np.max(np.abs(a_array.astype(float) - b_array.astype(float)))
        out.append(f"{where}: values differ (max |diff| {gap:.3g})")


def _equal_scalar(u: Any, v: Any) -> bool:
    if u is None or v is None:
        return u is v
    return bool(np.asarray(u == v).all())


# The parent collection (compared through the fields it fed) and wall times.
NOT_COMPARED = frozenset({"calibrated_explanations", "explain_time"})


def explanation_differences(ours: Any, theirs: Any) -> list[str]:
    """Every attribute of every explanation that differs between two collections.

    Every attribute in ``vars()`` of each explanation (its rules, conditions,
    binned values, prediction, cached probabilities, ...) but
    :data:`NOT_COMPARED`, bit for bit, plus ``get_rules()``.
    """
    out: list[str] = []
    if len(ours.explanations) != len(theirs.explanations):
        return [f"{len(ours.explanations)} != {len(theirs.explanations)} explanations"]
    for i, (a, b) in enumerate(
        zip(ours.explanations, theirs.explanations, strict=True)
    ):
        if type(a) is not type(b):
            out.append(f"[{i}]: {type(a).__name__} != {type(b).__name__}")
            continue
        mine, their = vars(a), vars(b)
        if mine.keys() != their.keys():
            out.append(f"[{i}]: attributes {sorted(mine)} != {sorted(their)}")
            continue
        for name in mine:
            if name not in NOT_COMPARED:
                _differences(mine[name], their[name], f"[{i}].{name}", out)
        _differences(a.get_rules(), b.get_rules(), f"[{i}].get_rules()", out)
    return out


def assert_same_explanations(ours: Any, theirs: Any) -> None:
    found = explanation_differences(ours, theirs)
    assert not found, f"{len(found)} differences, first: {found[:8]}"
