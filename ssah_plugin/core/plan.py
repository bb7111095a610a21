"""Turn a mask + policy into concrete frozen slices of a live model's parameters.

Resolution walks modules (never string surgery on parameter names), so it finds the right tensors inside DDP,
DeepSpeed engines and PEFT wrappers. For PEFT tuner layers the base weight is frozen by PEFT itself; the adapter
parameters that could change the frozen units are added instead (see :mod:`ssah_plugin.core.peft_layout`).

Planning is framework-free: PEFT set-ups are checked by the hosts before they plan
(:func:`ssah_plugin.hosts.peft.check_peft_setup`, called by ``SSAHCallback``, ``SSAHOptimizer`` and the DeepSpeed
glue); planning itself refuses adapter layers that are not plain LoRA by their structure
(:func:`ssah_plugin.core.peft_rules.check_lora_layer`).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ssah_plugin.core.frozen_slice import FrozenSlice
from ssah_plugin.core.peft_layout import (
    adapter_slices,
    base_module,
    find_module,
    find_weight,
    is_tuner_layer,
    saved_copies,
    saved_copy_slices,
)
from ssah_plugin.core.units import unwrap_model
from ssah_plugin.errors import UnsupportedSetupError

__all__ = ["FrozenSlice", "find_module", "find_weight", "plan_frozen_slices"]


def _refuse_parametrized(root: nn.Module, module_path: str, pname: str) -> None:
    """Refuse a unit-bearing weight computed by ``torch.nn.utils.parametrize`` (it is not a tensor we can restore)."""
    mod = find_module(root, module_path)
    mod = base_module(mod) if mod is not None else None
    if mod is not None and parametrize.is_parametrized(mod, pname):
        raise UnsupportedSetupError(
            f"{module_path}.{pname} is parametrized (torch.nn.utils.parametrize: "
            f"{', '.join(type(p).__name__ for p in mod.parametrizations[pname])}): the weight is computed from other "
            "tensors at every forward, so its frozen units cannot be restored slice by slice. Fix: bake the "
            f"parametrization in before training (torch.nn.utils.parametrize.remove_parametrizations(module, "
            f"{pname!r}, leave_parametrized=True)), or train without it")


@dataclass(frozen=True)
class MergedIndices:
    """The frozen indices along ``axis`` of one parameter, merged over every frozen unit (sorted, unique)."""

    index: torch.Tensor  # int64
    axis: int
    role: str
    shape: tuple[int, ...]  # the parameter's shape as recorded in the mask

    @property
    def numel(self) -> int:
        """Weight elements these indices freeze (the count :attr:`FrozenSlice.numel` gives on the live model)."""
        other = 1
        for d, n in enumerate(self.shape):
            if d != self.axis:
                other *= n
        return int(self.index.numel()) * other


def merged_frozen_indices(mask, policy: str | None = None) -> dict[tuple[str, str, int], MergedIndices]:
    """``(module, param, axis) -> MergedIndices`` for ``policy``, from the mask alone (no model needed).

    The first step of :func:`plan_frozen_slices`; also what ``ssah-plugin inspect`` and the Hub model card count.
    """
    parts: dict[tuple[str, str, int], list[torch.Tensor]] = defaultdict(list)
    info: dict[tuple[str, str, int], tuple[str, tuple[int, ...]]] = {}
    for g, frozen in zip(mask.groups, mask.frozen(policy)):
        if not bool(frozen.any()):
            continue
        for s in g.slices:
            key = (s.module, s.param, s.axis)
            parts[key].append(s.index[frozen].reshape(-1))
            info[key] = (s.role, tuple(s.shape))
    return {key: MergedIndices(torch.unique(torch.cat(p)), key[2], info[key][0], info[key][1])
            for key, p in parts.items()}


def plan_frozen_slices(mask, model: nn.Module, policy: str | None = None) -> list[FrozenSlice]:
    """Every frozen slice of ``model`` under ``policy``, one entry per (parameter, axis).

    Indices of all frozen units that touch the same parameter are merged (sorted, unique), so the per-step work is
    one vectorised ``index_copy_`` per parameter, whatever the number of units. Runs at set-up (before the first
    forward), never during training steps.
    """
    root = unwrap_model(model)
    merged = merged_frozen_indices(mask, policy)
    roles = {key: m.role for key, m in merged.items()}
    out: list[FrozenSlice] = []
    peft_layers: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    for (module_path, pname, axis), m in merged.items():
        idx = m.index
        copies = saved_copies(root, module_path)  # PEFT modules_to_save: the original and every adapter's copy
        if copies is not None:
            out.extend(saved_copy_slices(copies, pname, axis, roles[(module_path, pname, axis)], idx))
            continue
        mod = find_module(root, module_path)
        tuner = mod is not None and is_tuner_layer(mod)
        if tuner:
            peft_layers.append((mod, f"{module_path}.{pname}", roles[(module_path, pname, axis)], idx))
        _refuse_parametrized(root, module_path, pname)
        param = find_weight(root, module_path, pname)
        if param is None:  # validate() reports this; keep planning total
            continue
        out.append(FrozenSlice(f"{module_path}.{pname}", param, axis, idx.to(param.device),
                               meta={"role": roles[(module_path, pname, axis)], "peft_base": tuner}))
    for mod, name, role, idx in peft_layers:
        out.extend(adapter_slices(mod, name, role, idx))
    return out
