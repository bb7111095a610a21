"""Ranking helpers shared by the computed policies (:mod:`ssah_plugin.core.policies`) and the unit selections
(:mod:`ssah_plugin.core.selections`): fractions read from policy names, and global top-k across unit groups.

Rankings are global across unit groups, ties broken by position (group order, then unit index); a fraction ``F``
selects ``round(F * n_units)`` units. Pure bookkeeping on per-group tensors: runs when a policy is resolved (at
set-up of ``SSAHCallback`` / ``SSAHOptimizer``), never during training steps.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ssah_plugin.errors import SSAHError

__all__ = ["PolicyError", "parse_fraction", "top_k_global", "top_fraction"]


class PolicyError(SSAHError, ValueError):
    """A policy name that this mask cannot serve."""


def parse_fraction(text: str, policy: str) -> float:
    """The fraction written in ``policy`` (``"0.05"`` in ``"decision:0.05"``); :class:`PolicyError` unless in [0, 1]."""
    try:
        f = float(text)
    except ValueError:
        raise PolicyError(f"policy {policy!r}: {text!r} is not a number") from None
    if not 0.0 <= f <= 1.0:
        raise PolicyError(f"policy {policy!r}: fraction {f} is outside [0, 1]")
    return f


def top_k_global(values: Sequence[torch.Tensor], eligible: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per-group bool tensors marking the ``k`` highest ``values`` among ``eligible`` units across all groups (ties
    broken by position)."""
    flat_v = torch.cat([v.double() for v in values])
    flat_e = torch.cat(list(eligible))
    out = torch.zeros_like(flat_e)
    k = min(k, int(flat_e.sum()))
    if k > 0:
        cand = torch.nonzero(flat_e).squeeze(1)
        order = torch.argsort(flat_v[cand], descending=True, stable=True)
        out[cand[order[:k]]] = True
    return list(torch.split(out, [v.numel() for v in values]))


def top_fraction(values: Sequence[torch.Tensor], fraction: float, *, sign: float = 1.0) -> list[torch.Tensor]:
    """Per-group bool tensors marking the ``round(fraction * N)`` units with the highest ``sign * values`` across
    all groups (ties broken by position)."""
    vals = [v.to(torch.float64) * sign for v in values]
    n = sum(v.numel() for v in vals)
    return top_k_global(vals, [torch.ones(v.numel(), dtype=torch.bool) for v in vals], int(round(fraction * n)))
