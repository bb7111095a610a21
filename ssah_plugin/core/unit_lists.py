"""Explicit unit lists, the input of :meth:`ssah_plugin.core.mask.Mask.from_units`: integer indices or boolean masks.

Booleans are never read as the indices 0 and 1, floats are refused (``1.5`` is not a unit), and every problem of a
call is reported at once.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from ssah_plugin.core.units import UnitGroup

__all__ = ["unit_indices", "frozen_sets_from_units"]


def unit_indices(units, n: int) -> tuple[torch.Tensor, str]:
    """Unit indices from a list / range / tensor / array of ints, or from a boolean mask of length ``n``.

    Returns ``(indices, "")`` or ``(empty, reason)``; booleans are never read as the indices 0 and 1.
    """
    empty = torch.zeros(0, dtype=torch.int64)
    if isinstance(units, torch.Tensor):
        t = units.detach().cpu().reshape(-1)
    else:
        if isinstance(units, np.ndarray):
            t = torch.from_numpy(units.copy()).reshape(-1) if units.dtype != object else None
        else:
            t = None
        if t is None:
            items = list(units)
            if items and all(isinstance(u, (bool, np.bool_)) for u in items):
                t = torch.tensor([bool(u) for u in items], dtype=torch.bool)
            else:
                bad = [u for u in items if isinstance(u, bool) or not _is_int(u)]
                if bad:
                    return empty, (f"unit indices must be integers, got {bad[:3]!r} (pass a list of int indices, or a "
                                   f"boolean mask of all {n} units)")
                t = torch.tensor([int(u) for u in items], dtype=torch.int64)
    if t.dtype == torch.bool:
        if t.numel() != n:
            return empty, (f"a boolean mask must have one entry per unit ({n}), got {t.numel()}; or pass integer "
                           "indices")
        return t.nonzero().reshape(-1), ""
    if t.is_floating_point() or t.is_complex():
        return empty, (f"unit indices must be integers, got a {t.dtype} tensor (pass integer indices, or a boolean "
                       f"mask of all {n} units)")
    return t.to(torch.int64), ""


def _is_int(u) -> bool:
    return isinstance(u, numbers.Integral)


def frozen_sets_from_units(groups: Sequence[UnitGroup],
                           frozen: Mapping[str, Iterable[int]]) -> tuple[list[torch.Tensor], list[str]]:
    """Per-group bool tensors (True = frozen) from ``group name -> units``, and every problem found (not only the
    first): unknown group names, non-integer indices, wrong-length boolean masks, indices out of range."""
    by_name = {g.name: i for i, g in enumerate(groups)}
    sets = [torch.zeros(g.n_units, dtype=torch.bool) for g in groups]
    problems = []
    for name, units in frozen.items():
        if name not in by_name:
            problems.append(f"unknown unit group {name!r} (first groups: {', '.join(list(by_name)[:4])}, ...)")
            continue
        n = groups[by_name[name]].n_units
        idx, why = unit_indices(units, n)
        if why:
            problems.append(f"{name}: {why}")
            continue
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            problems.append(f"{name}: unit index out of range [0, {n}): {idx[(idx < 0) | (idx >= n)][:5].tolist()}")
            continue
        sets[by_name[name]][idx] = True
    return sets, problems
