"""Policies: which units to freeze, chosen at train time from one mask file.

=================  ================================================================================================
policy             frozen units
=================  ================================================================================================
``<stored name>``  a frozen set stored in the file (``explicit`` for masks built from unit lists)
``none``           nothing (useful as a baseline that still runs the same code path)
``scu``            the safety-critical units
``scu+cu``         SCU and every complex unit (paper setting ii, ~72% of units on Llama-2-7B-Chat)
``scu+cuN``        SCU plus the top N% *of all units* taken from CU, ranked by standardised safety importance
                   ``I_S`` (``scu+cu6`` is the paper's setting i: ~1.3% + 6%)
``scu+cu:F``       the same with a fraction F in [0, 1] (``scu+cu:0.06`` == ``scu+cu6``)
``ru-only``        everything except the redundant units (train only RU: the alignment-budget use)
``safety-top:F``   the top fraction F of all units by ``I_S - I_U`` (standardised), ignoring classes
``random:F``       a uniformly random fraction F of all units (fixed seed 0): a control, not a defence
``random-like:P``  as many units as policy ``P`` freezes *in every group*, chosen at random (seed 0): the control
                   that tells whether ``P``'s choice of units matters or only how many it freezes per layer
``decision:F``,    decision units / task-conflict units and unions with them (``scu+decision:0.05``), for masks
``conflict:F``     located with ``--decision-units`` / ``--task-data``: see :mod:`ssah_plugin.core.selections`
=================  ================================================================================================

Ranking CU by ``I_S`` (rather than ``I_S - I_U``) is our reading of "the most important CU for safety": CU are by
construction not the most safety-*specific* units, so their difference score is small, and the units that matter
to safety among them are those with the largest safety importance.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from ssah_plugin.core.classes import CLASS_CODES
from ssah_plugin.core.ranking import PolicyError, parse_fraction, top_k_global
from ssah_plugin.core.selections import resolve_selection

if TYPE_CHECKING:  # pragma: no cover
    from ssah_plugin.core.mask import Mask

__all__ = ["resolve_policy", "PolicyError", "POLICY_HELP", "SAFETY_Z", "UTILITY_Z", "LOCATED_DEFAULT_POLICY"]

SAFETY_Z = "safety_z"
UTILITY_Z = "utility_z"
POLICY_HELP = ("a stored set, 'none', 'scu', 'scu+cu', 'scu+cuN' (N percent), 'scu+cu:F', 'ru-only', 'safety-top:F', "
               "'decision:F', 'conflict:F', 'conflict-cos:F', unions such as 'scu+decision:F', controls 'random:F' "
               "and 'random-like:POLICY'")
#: the policy a located mask uses when the trainer names none. ``ru-only`` is the freezing policy that kept a real
#: model refusing through benign fine-tuning (Qwen2.5-Coder-0.5B-Instruct, 3 seeds: 73% vs 34% plain, kept 0.95 of the
#: lost refusals at 4% lower benign loss; the paper's setting (i) ``scu+cu6`` kept 0.06; docs/results-real-model.md)
LOCATED_DEFAULT_POLICY = "ru-only"
#: seed of the random control policies (fixed, so that every rank and every run resolves the same units)
RANDOM_SEED = 0


def _need_classes(mask: "Mask", policy: str) -> list[torch.Tensor]:
    if mask.classes is None:
        raise PolicyError(
            f"policy {policy!r} needs unit classes, but this mask has none (it stores: {mask.policies}). "
            "Create the mask with `ssah-plugin locate` or choose a stored policy"
        )
    return [c.to(torch.int64) for c in mask.classes]


def _need_score(mask: "Mask", kind: str, policy: str) -> list[torch.Tensor]:
    if kind not in mask.scores:
        raise PolicyError(f"policy {policy!r} needs the {kind!r} scores, which this mask does not store "
                          f"(it has {list(mask.scores)}); re-create it with `ssah-plugin locate`")
    return mask.scores[kind]


def resolve_policy(mask: "Mask", policy: str) -> list[torch.Tensor]:
    """Per-group boolean tensors (True = frozen) for ``policy``; raises :class:`PolicyError` if it cannot."""
    if not isinstance(policy, str) or not policy:
        raise PolicyError(f"policy must be a non-empty string ({POLICY_HELP})")
    if policy in mask.stored:
        return [s.clone() for s in mask.stored[policy]]
    if policy == "none":
        return [torch.zeros(g.n_units, dtype=torch.bool) for g in mask.groups]
    # the controls first: 'random-like:' takes the whole rest as its policy, unions included
    m = re.fullmatch(r"random:(.+)", policy)
    if m:
        frac = parse_fraction(m.group(1), policy)
        gen = torch.Generator().manual_seed(RANDOM_SEED)
        flat = torch.zeros(mask.n_units, dtype=torch.bool)
        flat[torch.randperm(mask.n_units, generator=gen)[: int(round(frac * mask.n_units))]] = True
        return list(torch.split(flat, [g.n_units for g in mask.groups]))
    m = re.fullmatch(r"random-like:(.+)", policy)
    if m:
        gen = torch.Generator().manual_seed(RANDOM_SEED)
        out = []
        for ref in resolve_policy(mask, m.group(1)):
            sel = torch.zeros(ref.numel(), dtype=torch.bool)
            sel[torch.randperm(ref.numel(), generator=gen)[: int(ref.sum())]] = True
            out.append(sel)
        return out
    selected = resolve_selection(mask, policy, resolve_policy)  # decision / conflict units and unions with them
    if selected is not None:
        return selected
    scu, cu, ru = CLASS_CODES["SCU"], CLASS_CODES["CU"], CLASS_CODES["RU"]
    if policy == "scu":
        return [c == scu for c in _need_classes(mask, policy)]
    if policy == "scu+cu":
        return [(c == scu) | (c == cu) for c in _need_classes(mask, policy)]
    if policy == "ru-only":
        return [c != ru for c in _need_classes(mask, policy)]
    m = re.fullmatch(r"scu\+cu(?::(.+)|(\d+(?:\.\d+)?))", policy)
    if m:
        text = m.group(1) if m.group(1) is not None else str(float(m.group(2)) / 100)
        frac = parse_fraction(text, policy)
        classes = _need_classes(mask, policy)
        extra = top_k_global(_need_score(mask, SAFETY_Z, policy), [c == cu for c in classes],
                              int(round(frac * mask.n_units)))
        return [(c == scu) | e for c, e in zip(classes, extra)]
    m = re.fullmatch(r"safety-top:(.+)", policy)
    if m:
        frac = parse_fraction(m.group(1), policy)
        s, u = _need_score(mask, SAFETY_Z, policy), _need_score(mask, UTILITY_Z, policy)
        diff = [a - b for a, b in zip(s, u)]
        return top_k_global(diff, [torch.ones_like(d, dtype=torch.bool) for d in diff], int(round(frac * mask.n_units)))
    raise PolicyError(f"unknown policy {policy!r}; this mask stores {mask.policies}; computed policies: {POLICY_HELP}")
