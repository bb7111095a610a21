"""Where PEFT puts a model's parameters, and which adapter slices keep frozen units exact (``peft`` never imported).

With plain LoRA a targeted weight becomes ``W + s · B @ A`` (``B``: ``lora_B.<adapter>.weight`` ``[out, r]``,
``A``: ``lora_A.<adapter>.weight`` ``[r, in]``; GPT-2's ``Conv1D`` is handled by PEFT with ``fan_in_fan_out`` and
the same logical shapes). PEFT freezes ``W`` itself, so a frozen unit only needs:

* role ``"out"`` (rows of a Linear weight, bias entries): row ``i`` of every ``lora_B`` (and entry ``i`` of its
  ``lora_bias``) stays exactly ``0.0``;
* role ``"in"`` (columns): column ``j`` of every ``lora_A`` stays exactly ``0.0``.

Then row ``i`` / column ``j`` of ``B @ A`` is exactly zero, whatever the other entries are, and the merged weight
equals the base there bit for bit (``W + 0 == W`` in floating point). Every adapter of the layer is covered, active
or not. The rows are held at zero by the ordinary :class:`~ssah_plugin.core.engine.FreezeEngine` (``fill=0.0``:
gradient masking during ``backward`` plus a restore after every ``optimizer.step()``).

``modules_to_save`` copies are full copies of modules, trained like full fine-tuning: their unit slices are frozen
with a snapshot, in the original module and in every adapter's copy (:func:`saved_copy_slices`). Trainable base
biases (``bias="all"`` / ``"lora_only"``) are frozen by the generic path of :mod:`ssah_plugin.core.plan`.

The layout, as PEFT documents it: a tuner layer keeps the wrapped module as ``base_layer`` under the original
module path; a ``ModulesToSaveWrapper`` keeps ``original_module`` and one copy per adapter in ``modules_to_save``.
Which set-ups are refused is :mod:`ssah_plugin.core.peft_rules`.
"""
from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ssah_plugin.core.frozen_slice import FrozenSlice
from ssah_plugin.core.peft_rules import check_lora_layer, fix_hint
from ssah_plugin.errors import UnsupportedSetupError

__all__ = [
    "adapter_slices",
    "base_module",
    "find_module",
    "find_weight",
    "holds_values",
    "is_tuner_layer",
    "loaded_peft",
    "saved_copies",
    "saved_copy_slices",
]


def loaded_peft():
    """The ``peft`` package if this process has imported it, else ``None``.

    Core code never imports ``peft``; without it imported, no PEFT object can exist, so ``isinstance`` checks
    against its classes are made only when this returns the module.
    """
    return sys.modules.get("peft")


def is_tuner_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer: it wraps the original module as ``base_layer`` (also true of a foreign wrapper, which
    planning then refuses)."""
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def base_module(module: nn.Module) -> nn.Module:
    """The original module inside (possibly nested) tuner layers; ``module`` itself when it is not one."""
    while is_tuner_layer(module):
        module = module.base_layer
    return module


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def find_weight(root: nn.Module, module_path: str, pname: str) -> nn.Parameter | None:
    """The parameter ``pname`` of the module at ``module_path`` (inside a PEFT tuner layer: of its base layer)."""
    mod = find_module(root, module_path)
    if mod is None:
        return None
    p = getattr(base_module(mod), pname, None)
    return p if isinstance(p, torch.Tensor) else None


# ---------------------------------------------------------------------------------------------------- LoRA layers
def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """The logical shape: a sharded placeholder records it apart from its (empty) local storage."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def holds_values(p: torch.Tensor) -> bool:
    """Whether ``p``'s own storage holds all of its values, so they can be read here.

    False for a sharded placeholder whose storage is empty or smaller than its logical shape (a DeepSpeed ZeRO-3
    partition outside a gather: the host reads or writes such values itself), and for an empty tensor.
    """
    return p.numel() > 0 and p.numel() == math.prod(_shape(p))


def _check_zero(module: nn.Module, adapter: str, role: str, idx: torch.Tensor, name: str) -> None:
    """Warn when an adapter already changes frozen units (``B @ A`` non-zero there).

    That happens with ``init_lora_weights=False`` (random ``B``) or an adapter trained without the mask. A zero
    ``B`` (the default initialisation) passes even though ``A``'s frozen columns are non-zero: zeroing those
    columns at attach leaves the model's function unchanged.
    """
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    bias = getattr(module.lora_B[adapter], "bias", None)
    if not (holds_values(a) and holds_values(b)):
        return  # sharded (ZeRO-3 partitions): the values are not here; the host's enforcer applies the fill
    with torch.no_grad():
        if role == "out":
            changed = bool((b.index_select(0, idx.to(b.device)) @ a).any())
            if bias is not None:
                changed |= bool(bias.index_select(0, idx.to(bias.device)).any())
        else:
            changed = bool((b @ a.index_select(1, idx.to(a.device))).any())
    if not changed:
        return
    if a.requires_grad or b.requires_grad:
        warnings.warn(
            f"ssah-plugin: LoRA adapter {adapter!r} already changes frozen units of {name} (B @ A is non-zero "
            "there); its frozen rows/columns are set to zero now so that the frozen units are exact (expected with "
            "init_lora_weights=False; otherwise the adapter was trained without the mask).",
            RuntimeWarning, stacklevel=4)
    else:
        warnings.warn(
            f"ssah-plugin: inactive LoRA adapter {adapter!r} changes frozen units of {name}; it is not trained now "
            "and is left as it is, but merging it will change those units. Activate it while training with the "
            "mask, or delete it.", RuntimeWarning, stacklevel=4)


def adapter_slices(module: nn.Module, name: str, role: str, idx: torch.Tensor) -> list[FrozenSlice]:
    """The adapter slices that must stay zero so that the frozen ``idx`` of ``name`` are untouched.

    Args:
        module: a PEFT tuner layer (has ``base_layer``) wrapping the module that owns ``name``.
        name: ``"<module path>.<param>"`` of the unit-bearing base parameter (``weight`` or ``bias``).
        role: ``"out"`` (indices are output channels) or ``"in"`` (input channels).
        idx: sorted unique int64 indices of frozen channels.

    Returns:
        One :class:`FrozenSlice` with ``fill=0.0`` per adapter (rows of ``lora_B`` for ``"out"``, columns of
        ``lora_A`` for ``"in"``), plus the entries of ``lora_B``'s bias (``lora_bias=True``) for ``"out"``. Bias
        slices of the base return ``[]`` here: the base bias is handled as an ordinary parameter, and the
        adapter's bias entries come with the weight rows.

    Raises:
        UnsupportedSetupError: the layer is not plain LoRA, uses a variant (DoRA, ...), or is merged
            (:func:`ssah_plugin.core.peft_rules.check_lora_layer`).
    """
    module_path, _, pname = name.rpartition(".")
    check_lora_layer(module, module_path)
    if pname != "weight":
        return []
    if role not in ("in", "out"):
        raise ValueError(f"role must be 'in' or 'out', got {role!r}")
    out: list[FrozenSlice] = []
    adapters = sorted(set(module.lora_A.keys()) | set(module.lora_B.keys()))
    for adapter in adapters:
        mine: list[FrozenSlice] = []
        if role == "out":
            lin = module.lora_B[adapter]
            targets = [("weight", lin.weight, 0)]
            if getattr(lin, "bias", None) is not None:
                targets.append(("bias", lin.bias, 0))
            size = getattr(module, "out_features", None)
        else:
            lin = module.lora_A[adapter]
            targets = [("weight", lin.weight, 1)]
            size = getattr(module, "in_features", None)
        for tname, param, axis in targets:
            shape = _shape(param)
            if len(shape) <= axis or (size is not None and shape[axis] != size):
                raise UnsupportedSetupError(
                    f"{module_path}.lora_{'B' if role == 'out' else 'A'}.{adapter}.{tname} has shape {list(shape)}, "
                    f"not a plain LoRA factor of a layer with {size} {'outputs' if role == 'out' else 'inputs'}. "
                    + fix_hint())
            if idx.numel() and int(idx.max()) >= shape[axis]:
                raise UnsupportedSetupError(
                    f"frozen index {int(idx.max())} of {name} is out of range for the LoRA factor of adapter "
                    f"{adapter!r} (size {shape[axis]}); the mask does not fit this model")
            factor = "lora_B" if role == "out" else "lora_A"
            mine.append(FrozenSlice(f"{module_path}.{factor}.{adapter}.{tname}", param, axis,
                                    idx.to(param.device), fill=0.0,
                                    meta={"role": role, "adapter": adapter, "unit_param": name, "peft": factor}))
        _check_zero(module, adapter, role, idx, name)
        out.extend(mine)
    return out


# ---------------------------------------------------------------------------------------------------- modules_to_save
def _is_saved_wrapper(module: nn.Module) -> bool:
    """PEFT's ``ModulesToSaveWrapper``: ``original_module`` plus a ``modules_to_save`` dict of per-adapter copies."""
    mods = module._modules
    return isinstance(mods.get("original_module"), nn.Module) and isinstance(mods.get("modules_to_save"),
                                                                             nn.ModuleDict)


def _expand(path: str, module: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    if not _is_saved_wrapper(module):
        return [(path, module, False)]
    pre = f"{path}." if path else ""
    out = [(f"{pre}original_module", module._modules["original_module"], False)]
    out += [(f"{pre}modules_to_save.{a}", m, True) for a, m in module._modules["modules_to_save"].items()]
    return out


def saved_copies(root: nn.Module, module_path: str) -> list[tuple[str, nn.Module, bool]] | None:
    """Every version of ``module_path`` under PEFT ``modules_to_save``: ``[(path, module, is_copy)]``.

    Walks real sub-modules (``_modules``, no attribute forwarding), expanding each ``ModulesToSaveWrapper`` met on
    the way (the wrapped module itself or one of its parents) into its ``original_module`` and every adapter's copy.
    Returns ``None`` when no wrapper lies on the path (the ordinary case).
    """
    cands: list[tuple[str, nn.Module, bool]] = [("", root, False)]
    wrapped = False
    for comp in module_path.split(".") if module_path else []:
        nxt: list[tuple[str, nn.Module, bool]] = []
        for path, mod, is_copy in cands:
            for p2, m2, c2 in _expand(path, mod):
                wrapped |= m2 is not mod
                child = m2._modules.get(comp)
                if isinstance(child, nn.Module):
                    nxt.append((f"{p2}.{comp}" if p2 else comp, child, is_copy or c2))
        cands = nxt
    final: list[tuple[str, nn.Module, bool]] = []
    for path, mod, is_copy in cands:
        for p2, m2, c2 in _expand(path, mod):
            wrapped |= m2 is not mod
            final.append((p2, m2, is_copy or c2))
    return final if wrapped else None


def saved_copy_slices(copies: Iterable[tuple[str, nn.Module, bool]], pname: str, axis: int, role: str,
                      idx: torch.Tensor) -> list[FrozenSlice]:
    """Snapshot slices (``fill=None``) of ``pname`` in the original module and every ``modules_to_save`` copy.

    The copies are trained as full tensors, so the full-tensor rule applies: their frozen slices keep the values
    they have when enforcement starts, which are the base values as long as the copy was made from the base (PEFT
    deep-copies it). A copy that already differs from the original on frozen units is reported with a warning.
    """
    copies = list(copies)
    out: list[FrozenSlice] = []
    original = None
    for path, mod, is_copy in copies:
        p = mod._parameters.get(pname)
        if not isinstance(p, torch.Tensor):
            continue
        i = idx.to(p.device)
        if not is_copy:
            original = (p, i)
        out.append(FrozenSlice(f"{path}.{pname}", p, axis, i, meta={"role": role, "modules_to_save": is_copy}))
    if original is not None and holds_values(original[0]):
        ref = original[0].detach().index_select(axis, original[1])
        for s in out:
            if s.meta["modules_to_save"] and holds_values(s.param) and s.param.shape == original[0].shape \
                    and not torch.equal(s.param.detach().index_select(axis, s.index).to(ref.dtype), ref):
                warnings.warn(
                    f"ssah-plugin: modules_to_save copy {s.name} already differs from the base on frozen units (was it "
                    "trained without the mask?); they are kept at their current values, not the base's.",
                    RuntimeWarning, stacklevel=3)
    return out
