"""Ablation: zero the weight slices of chosen units in place and restore them bit-exactly (the paper's Table 1).

No hooks and no gradients: :func:`zero_units` edits weights under ``torch.no_grad()``; :func:`ablation_study`
generates and scores between edits. Used by ``ssah-plugin ablate`` and by the auto-size sweep
(:mod:`ssah_plugin.locate.auto_sizes`).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from ssah_plugin.core.mask import CLASS_CODES, Mask
from ssah_plugin.core.plan import plan_frozen_slices
from ssah_plugin.data.rows import Pair
from ssah_plugin.errors import DataError
from ssah_plugin.evaluation.metrics import attack_success_rate, benign_loss

__all__ = ["class_selection", "zero_units", "restore_units", "ablated_copy", "ablation_study"]


def class_selection(mask: Mask, classes: Sequence[str]) -> list[torch.Tensor]:
    """Per-group boolean tensors: True for the units whose class is in ``classes``."""
    if mask.classes is None:
        raise DataError("this mask has no unit classes; create it with `ssah-plugin locate`")
    codes = [CLASS_CODES[c] for c in classes]
    return [torch.isin(c.to(torch.int64), torch.tensor(codes)) for c in mask.classes]


def zero_units(model: nn.Module, mask: Mask, selected: Sequence[torch.Tensor] | Sequence[str], *,
               output_only: bool = False, keep: bool = False) -> list[tuple]:
    """Set the weight slices of the selected units to zero, in place (pruning; no gradient involved).

    Args:
        selected: per-group boolean tensors, or class names (``["SCU"]``).
        output_only: zero only the unit's input channel of ``B`` (column of ``down_proj`` / ``o_proj``), which
            removes exactly that unit's contribution; by default every slice the mask lists is zeroed (with
            grouped-query attention, an attention unit's value row is shared with other heads' units).
        keep: return ``(param, axis, index, saved_values)`` tuples so :func:`restore_units` can undo the change.

    Resolution is :func:`ssah_plugin.core.plan.plan_frozen_slices` on a copy of the mask whose only stored set is
    the selection, so exactly the slices freezing would protect are touched.
    """
    if selected and isinstance(selected[0], str):
        selected = class_selection(mask, selected)  # type: ignore[arg-type]
    tmp = dataclasses.replace(mask, stored={"_ablate": [s.bool() for s in selected]}, default_policy="_ablate")
    if output_only:
        tmp.groups = [dataclasses.replace(g, slices=[s for s in g.slices if s.module == g.score_module
                                                     and s.role == "in"]) for g in mask.groups]
    saved = []
    with torch.no_grad():
        for fs in plan_frozen_slices(tmp, model, "_ablate"):
            if keep:
                saved.append((fs.param, fs.axis, fs.index, fs.param.index_select(fs.axis, fs.index).clone()))
            fs.param.index_fill_(fs.axis, fs.index, 0.0)
    return saved


def restore_units(saved: Sequence[tuple]) -> None:
    """Undo :func:`zero_units` (``keep=True``) bit-exactly."""
    with torch.no_grad():
        for param, axis, index, values in saved:
            param.index_copy_(axis, index, values)


def ablated_copy(model: nn.Module, mask: Mask, classes: Sequence[str], *, output_only: bool = False) -> nn.Module:
    """A deep copy of ``model`` with the units of ``classes`` zeroed (the original is untouched)."""
    clone = copy.deepcopy(model)
    zero_units(clone, mask, list(classes), output_only=output_only)
    return clone


def ablation_study(model, tokenizer, mask: Mask, classes: Sequence[str], harmful: Sequence[Any],
                   benign: Sequence[Pair], *, max_new_tokens: int = 64, batch_size: int = 8,
                   output_only: bool = False, system: str | None = None, progress: bool = True) -> list[dict]:
    """The paper's Table 1 on ``model``: refusal / attack success rate on ``harmful`` prompts and benign loss on
    ``benign`` pairs for the dense model and with each class in ``classes`` removed (one at a time).

    Units are zeroed in place and restored bit-exactly after each row, so only one copy of the model is needed.
    """
    def row(name: str, units: int) -> dict:
        asr = attack_success_rate(model, tokenizer, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  system=system, progress=progress)
        loss = benign_loss(model, tokenizer, benign, batch_size=batch_size, system=system, progress=progress)
        return {"model": name, "units_removed": units, "fraction_removed": units / max(mask.n_units, 1),
                "asr": asr["asr"], "refusal_rate": asr["refusal_rate"], "n_harmful": asr["n"],
                "benign_loss": loss["loss"], "benign_perplexity": loss["perplexity"], "n_benign": loss["n"]}

    rows = [row("dense", 0)]
    for cls in classes:
        sel = class_selection(mask, [cls])
        saved = zero_units(model, mask, sel, output_only=output_only, keep=True)
        try:
            rows.append(row(f"-{cls}", int(sum(int(s.sum()) for s in sel))))
        finally:
            restore_units(saved)
    return rows
