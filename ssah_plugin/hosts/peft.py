"""PEFT / LoRA hosts: the set-up check that needs ``peft`` itself, and the comparison of merged models.

Frozen units stay exact in the adapter, in ``merge_and_unload`` and in saved adapters because the LoRA factors'
rows / columns of frozen units are held at zero (the layout and the slices: :mod:`ssah_plugin.core.peft_layout`;
what is refused: :mod:`ssah_plugin.core.peft_rules`). This module adds what needs PEFT's classes:
:func:`check_peft_setup` finds the adapter configurations on every PEFT path (``PeftModel`` / ``get_peft_model``,
TRL's ``peft_config=``, transformers' ``add_adapter``) and refuses any tuner layer that is not a ``peft`` LoRA layer
(``peft.inject_adapter_in_model`` keeps no configuration; its base-rewriting initialisations fail the mask's
base-value check, :func:`ssah_plugin.core.digest.check_base_values`).

``peft`` is never imported by this module: when the process has not imported it, no PEFT object can exist, and the
checks pass without importing it (:func:`ssah_plugin.core.peft_layout.loaded_peft`).
"""
from __future__ import annotations

import torch
from torch import nn

from ssah_plugin.core.peft_layout import find_weight, is_tuner_layer, loaded_peft
from ssah_plugin.core.peft_rules import check_lora_configs, refuse_layer_class
from ssah_plugin.core.units import unwrap_model

__all__ = ["check_peft_setup", "peft_configs", "compare_frozen_units"]


def peft_configs(model: nn.Module) -> dict:
    """``{adapter_name: config}`` of the PEFT model inside ``model`` (DDP / DeepSpeed wrappers looked through).

    Found on ``PeftModel`` / ``PeftMixedModel`` and the tuner (``BaseTuner``, e.g. ``LoraModel``), and on a
    transformers model that got its adapters from ``model.add_adapter(config)`` (transformers' PEFT integration
    keeps the configs in ``model.peft_config`` and sets ``_hf_peft_config_loaded``).
    """
    peft = loaded_peft()
    if peft is None:
        return {}
    from peft.tuners.tuners_utils import BaseTuner

    owners = (peft.PeftModel, BaseTuner, *((peft.PeftMixedModel,) if hasattr(peft, "PeftMixedModel") else ()))
    for m in model.modules():
        if not isinstance(m, owners) and not getattr(m, "_hf_peft_config_loaded", False):
            continue
        try:  # PeftModel (a property for prompt learning) and the tuner (LoraModel) both hold it
            cfg = getattr(m, "peft_config", None)
        except AttributeError:
            cfg = None
        if isinstance(cfg, dict) and cfg:
            return cfg
    return {}


def check_peft_setup(model: nn.Module) -> None:
    """Refuse PEFT configurations whose weight change is not ``s · B @ A`` on an unchanged base weight.

    Checks every adapter configuration (:func:`ssah_plugin.core.peft_rules.check_lora_configs`) and that every
    tuner layer is a ``peft`` ``LoraLayer``. Called when enforcement is set up (``SSAHCallback.on_train_begin``,
    ``SSAHOptimizer``, the DeepSpeed glue, through :func:`ssah_plugin.hosts.enforce.build_enforcer`), before the
    first forward and before planning. A model without PEFT passes untouched.

    Raises:
        UnsupportedSetupError: naming the adapter or layer, the offending option and the fix.
    """
    peft = loaded_peft()
    if peft is None:
        return  # no PEFT object can exist; a foreign base_layer wrapper is refused by planning (check_lora_layer)
    check_lora_configs(peft_configs(model))
    from peft.tuners.lora import LoraLayer

    for name, module in unwrap_model(model).named_modules():
        if is_tuner_layer(module) and not isinstance(module, LoraLayer):
            refuse_layer_class(module, name)


@torch.no_grad()
def compare_frozen_units(mask, base: nn.Module, tuned: nn.Module, policy: str | None = None) -> dict:
    """Compare two plain (merged) models slice by slice: which frozen slices differ, how many unfrozen ones moved.

    Returns ``{"mismatched": [slice names whose frozen entries are not bitwise equal], "changed_unfrozen": number
    of unit slices whose unfrozen entries changed, "checked": number of frozen slices compared}``. Both models must
    be plain transformers models (``merge_and_unload`` output, not a ``PeftModel``).
    """
    rb, rt = unwrap_model(base), unwrap_model(tuned)
    mismatched: list[str] = []
    changed = checked = 0
    for g, frozen in zip(mask.groups, mask.frozen(policy)):
        for s in g.slices:
            wb, wt = find_weight(rb, s.module, s.param), find_weight(rt, s.module, s.param)
            if wb is None or wt is None:
                mismatched.append(f"{s.name} (missing)")
                continue
            fi = s.index[frozen].reshape(-1).to(wb.device)
            ui = s.index[~frozen].reshape(-1).to(wb.device)
            if fi.numel():
                checked += 1
                if not torch.equal(wb.index_select(s.axis, fi), wt.to(wb.device).index_select(s.axis, fi)):
                    mismatched.append(s.name)
            if ui.numel() and not torch.equal(wb.index_select(s.axis, ui), wt.to(wb.device).index_select(s.axis, ui)):
                changed += 1
    return {"mismatched": mismatched, "changed_unfrozen": changed, "checked": checked}
