"""Turn a mask + policy into concrete frozen slices of a live model's parameters.

Resolution walks modules (never string surgery on parameter names), so it finds the right tensors inside DDP,
DeepSpeed engines and PEFT wrappers. For PEFT tuner layers the base weight is frozen by PEFT itself; the adapter
parameters that could change the frozen units are added instead (see :mod:`ssah_plugin.hosts.peft`).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from ssah_plugin.core.units import unwrap_model

__all__ = ["FrozenSlice", "find_module", "find_weight", "plan_frozen_slices"]


@dataclass
class FrozenSlice:
    """Indices ``index`` along ``axis`` of ``param`` that must never change.

    ``fill`` is ``None`` to keep the values the parameter has when enforcement starts (snapshot), or a number the
    slice must always equal (LoRA rows/columns kept at zero).
    """

    name: str
    param: nn.Parameter
    axis: int
    index: torch.Tensor  # int64, sorted, unique, on the parameter's device
    fill: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        shape = tuple(getattr(self.param, "ds_shape", None) or self.param.shape)
        other = 1
        for d, n in enumerate(shape):
            if d != self.axis:
                other *= n
        return int(self.index.numel()) * other


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _is_tuner_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def find_weight(root: nn.Module, module_path: str, pname: str) -> nn.Parameter | None:
    """The parameter ``pname`` of the module at ``module_path`` (inside a PEFT tuner layer: of its base layer)."""
    mod = find_module(root, module_path)
    while mod is not None and _is_tuner_layer(mod):
        mod = mod.base_layer
    if mod is None:
        return None
    p = getattr(mod, pname, None)
    return p if isinstance(p, torch.Tensor) else None


def _refuse_parametrized(root: nn.Module, module_path: str, pname: str) -> None:
    """Refuse a unit-bearing weight computed by ``torch.nn.utils.parametrize`` (it is not a tensor we can restore)."""
    from torch.nn.utils import parametrize

    from ssah_plugin.errors import UnsupportedSetupError

    mod = find_module(root, module_path)
    while mod is not None and _is_tuner_layer(mod):
        mod = mod.base_layer
    if mod is not None and parametrize.is_parametrized(mod, pname):
        raise UnsupportedSetupError(
            f"{module_path}.{pname} is parametrized (torch.nn.utils.parametrize: "
            f"{', '.join(type(p).__name__ for p in mod.parametrizations[pname])}): the weight is computed from other "
            "tensors at every forward, so its frozen units cannot be restored slice by slice. Fix: bake the "
            f"parametrization in before training (torch.nn.utils.parametrize.remove_parametrizations(module, "
            f"{pname!r}, leave_parametrized=True)), or train without it")


def plan_frozen_slices(mask, model: nn.Module, policy: str | None = None) -> list[FrozenSlice]:
    """Every frozen slice of ``model`` under ``policy``, one entry per (parameter, axis).

    Indices of all frozen units that touch the same parameter are merged (sorted, unique), so the per-step work is
    one vectorised ``index_copy_`` per parameter, whatever the number of units.
    """
    from ssah_plugin.hosts.peft import check_peft_setup, saved_copies, saved_copy_slices

    check_peft_setup(model)  # refuse DoRA, PiSSA, non-LoRA PEFT methods... before anything else
    root = unwrap_model(model)
    sets = mask.frozen(policy)
    merged: dict[tuple[str, str, int], list[torch.Tensor]] = defaultdict(list)
    roles: dict[tuple[str, str, int], str] = {}
    for g, frozen in zip(mask.groups, sets):
        if not bool(frozen.any()):
            continue
        for s in g.slices:
            key = (s.module, s.param, s.axis)
            merged[key].append(s.index[frozen].reshape(-1))
            roles[key] = s.role
    out: list[FrozenSlice] = []
    peft_layers: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    for (module_path, pname, axis), parts in merged.items():
        idx = torch.unique(torch.cat(parts))
        copies = saved_copies(root, module_path)  # PEFT modules_to_save: the original and every adapter's copy
        if copies is not None:
            out.extend(saved_copy_slices(copies, pname, axis, roles[(module_path, pname, axis)], idx))
            continue
        mod = find_module(root, module_path)
        tuner = mod is not None and _is_tuner_layer(mod)
        if tuner:
            peft_layers.append((mod, f"{module_path}.{pname}", roles[(module_path, pname, axis)], idx))
        _refuse_parametrized(root, module_path, pname)
        param = find_weight(root, module_path, pname)
        if param is None:  # validate() reports this; keep planning total
            continue
        out.append(FrozenSlice(f"{module_path}.{pname}", param, axis, idx.to(param.device),
                               meta={"role": roles[(module_path, pname, axis)], "peft_base": tuner}))
    if peft_layers:
        from ssah_plugin.hosts.peft import adapter_slices

        for mod, name, role, idx in peft_layers:
            out.extend(adapter_slices(mod, name, role, idx))
    return out
