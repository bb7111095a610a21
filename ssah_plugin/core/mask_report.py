"""Units and weight elements frozen per policy, from the mask alone (no model).

One implementation for ``ssah-plugin inspect`` (:mod:`ssah_plugin.cli.inspect_mask`) and the Hub model card
(:mod:`ssah_plugin.core.card`). Framework-free; it never imports :mod:`ssah_plugin.core.mask` (which imports the hub
mixin, which writes the card), so there is no import cycle.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ssah_plugin.core.plan import merged_frozen_indices

if TYPE_CHECKING:  # pragma: no cover
    from ssah_plugin.core.mask import Mask

__all__ = ["CLASSIFIED_POLICIES", "frozen_table", "listed_policies"]

#: policies every classified mask (``ssah-plugin locate``) can serve; listed by inspect and on the model card
CLASSIFIED_POLICIES = ("scu", "scu+cu6", "scu+cu", "ru-only")


def listed_policies(mask: Mask, extra_policies: Iterable[str] = ()) -> list[str]:
    """The policies a report lists: the stored sets, the classified ones (masks with classes), then ``extra``."""
    policies = list(mask.policies)
    if mask.classes is not None:
        policies += [p for p in CLASSIFIED_POLICIES if p not in policies]
    policies += [p for p in extra_policies if p not in policies]
    return policies


def frozen_table(mask: Mask, policies: Iterable[str]) -> dict[str, dict]:
    """``policy -> {units, fraction, per_module_type, elements}``.

    ``units``: frozen units; ``fraction``: of all units; ``per_module_type``: frozen units per ``mlp`` / ``attn``;
    ``elements``: weight elements frozen, i.e. what :func:`~ssah_plugin.core.plan.plan_frozen_slices` freezes on the
    model the mask was made for (indices shared by several units counted once).
    """
    frozen = {}
    for pol in policies:
        sets = mask.frozen(pol)
        by_kind: dict = {}
        for g, s in zip(mask.groups, sets):
            by_kind[g.kind] = by_kind.get(g.kind, 0) + int(s.sum())
        total = sum(by_kind.values())
        elements = sum(m.numel for m in merged_frozen_indices(mask, pol).values())
        frozen[pol] = {"units": total, "fraction": total / max(mask.n_units, 1), "per_module_type": by_kind,
                       "elements": elements}
    return frozen
