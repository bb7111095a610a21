"""Unit selections beyond the four classes: *decision units* and *task-conflict units* (issue 10).

``locate`` can score two more properties of every unit (see :mod:`ssah_plugin.locate.decision` and
:mod:`ssah_plugin.locate.conflict`); each becomes per-unit scores in the mask, one stored frozen set (the top
fraction chosen at locate time) and a family of computed policies (any fraction, chosen at train time):

=======================  ==========================================================================================
policy                   frozen units
=======================  ==========================================================================================
``decision``             stored set: the top ``decision_fraction`` of all units by ``decision_z``
``decision:F``           the top fraction F of all units by ``decision_z`` (highest = most separating)
``conflict``             stored set: the top ``conflict_fraction`` of all units by ``-conflict_dot``
``conflict:F``           the fraction F of all units with the most negative ``conflict_dot`` (most conflicting)
``conflict-cos:F``       the same ranked by the cosine ``conflict_cos``
``A+B``                  union, where ``A`` or ``B`` is one of the selection terms above and the other any policy:
                         ``scu+decision:0.05``, ``scu+cu6+conflict:0.02``, ``decision:0.05+conflict:0.05``
=======================  ==========================================================================================

Rankings are global across unit groups, ties broken by position (group order, then unit index), sizes
``round(F * n_units)``: exactly as the other computed policies of :mod:`ssah_plugin.core.policies` (both use
:mod:`ssah_plugin.core.ranking`).

This module is pure bookkeeping on a :class:`~ssah_plugin.core.mask.Mask` (no model, no framework); it runs when a
policy is resolved, i.e. at set-up of ``SSAHCallback`` / ``SSAHOptimizer``, never during training steps.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

import torch

from ssah_plugin.core.ranking import PolicyError, parse_fraction, top_fraction

if TYPE_CHECKING:  # pragma: no cover
    from ssah_plugin.core.mask import Mask

__all__ = [
    "DECISION", "DECISION_Z", "CONFLICT_DOT", "CONFLICT_COS", "SELECTION_POLICY_HELP",
    "resolve_selection", "store_selection", "selection_config_problems", "top_fraction",
]

DECISION = "decision"          # raw decision score per unit
DECISION_Z = "decision_z"      # standardised like the other scores (LocateConfig.standardize); ranks decision:F
CONFLICT_DOT = "conflict_dot"  # <g_task_u, g_refusal_u>; ranks conflict:F (most negative first)
CONFLICT_COS = "conflict_cos"  # cosine of the same blocks; ranks conflict-cos:F

SELECTION_POLICY_HELP = "'decision', 'decision:F', 'conflict', 'conflict:F', 'conflict-cos:F', unions 'scu+decision:F'"

#: term -> (score kind, sign applied before taking the highest, locate option that creates the scores)
_TERMS = {
    "decision": (DECISION_Z, 1.0, "--decision-units (LocateConfig(decision_units=True))"),
    "conflict": (CONFLICT_DOT, -1.0, "--task-data FILE (locate(..., task=...))"),
    "conflict-cos": (CONFLICT_COS, -1.0, "--task-data FILE (locate(..., task=...))"),
}
_TERM = r"(?:decision|conflict-cos|conflict)(?::[^+]*)?"


def _term(mask: "Mask", term: str, policy: str) -> list[torch.Tensor]:
    name, colon, frac = term.partition(":")
    kind, sign, option = _TERMS[name]
    if not colon and name in mask.stored:
        return [s.clone() for s in mask.stored[name]]
    if kind not in mask.scores:
        raise PolicyError(f"policy {policy!r} needs the {name} selection (scores {kind!r}), which this mask does not "
                     f"store (it has scores {list(mask.scores)}, stored sets {mask.policies}); re-create the mask "
                     f"with `ssah-plugin locate {option.split(' (')[0]}`")
    if not colon:
        raise PolicyError(f"policy {policy!r}: give the fraction of all units, e.g. '{name}:0.05'")
    return top_fraction(mask.scores[kind], parse_fraction(frac, policy), sign=sign)


def resolve_selection(mask: "Mask", policy: str,
                      resolve: Callable[["Mask", str], list[torch.Tensor]]) -> list[torch.Tensor] | None:
    """The frozen sets of a selection policy, or ``None`` if ``policy`` names no selection term.

    ``resolve`` resolves the other side of a union (``ssah_plugin.core.policies.resolve_policy``). Raises
    :class:`~ssah_plugin.core.ranking.PolicyError` for a bad fraction or a selection the mask does not hold.
    """
    if re.fullmatch(_TERM, policy):
        return _term(mask, policy, policy)
    m = re.fullmatch(rf"(.+)\+({_TERM})", policy) or re.fullmatch(rf"({_TERM})\+(.+)", policy)
    if m is None:
        return None
    left, right = m.group(1), m.group(2)
    a = _term(mask, left, policy) if re.fullmatch(_TERM, left) else resolve(mask, left)
    b = _term(mask, right, policy) if re.fullmatch(_TERM, right) else resolve(mask, right)
    return [x | y for x, y in zip(a, b)]


def store_selection(mask: "Mask", name: str, scores: dict[str, list[torch.Tensor]], rank_kind: str, sign: float,
                    fraction: float, method: dict) -> "Mask":
    """Add a selection to ``mask`` in place: its score kinds, the stored set ``name`` (top ``fraction`` by
    ``sign * scores[rank_kind]``) and ``method["selections"][name]``."""
    for kind, per_group in scores.items():
        mask.scores[kind] = [t.to(torch.float64).cpu() for t in per_group]
    mask.stored[name] = top_fraction(mask.scores[rank_kind], fraction, sign=sign)
    entry = dict(method, fraction=fraction, stored_units=int(sum(int(s.sum()) for s in mask.stored[name])),
                 rank=f"{'highest' if sign > 0 else 'lowest'} {rank_kind}, global across groups")
    mask.method = dict(mask.method, selections=dict(mask.method.get("selections", {}), **{name: entry}))
    return mask


def selection_config_problems(cfg) -> list[str]:
    """Validation of the LocateConfig fields of the selections (merged into LocateConfig's one error)."""
    problems = []
    for name in ("decision_fraction", "conflict_fraction"):
        v = getattr(cfg, name)
        if not 0.0 <= v <= 1.0:
            problems.append(f"{name} must be a fraction in [0, 1], got {v}")
    if cfg.decision_weight not in ("norm", "none"):
        problems.append(f"decision_weight must be 'norm' or 'none', got {cfg.decision_weight!r}")
    if cfg.task_max_samples is not None and cfg.task_max_samples < 1:
        problems.append(f"task_max_samples must be >= 1 or None, got {cfg.task_max_samples}")
    return problems
