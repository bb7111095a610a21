"""PEFT / LoRA support: frozen units stay exact in the adapter, in ``merge_and_unload`` and in saved adapters.

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

Everything whose weight change is not ``B @ A`` on an unchanged base is refused at setup, on every PEFT path
(``PeftModel`` / ``get_peft_model``, TRL's ``peft_config=``, transformers' ``add_adapter``, and
``peft.inject_adapter_in_model``, where the rewritten base weights fail the mask's base-value check)
(:func:`check_peft_setup`): DoRA, PiSSA / OLoRA / LoftQ / CorDA / ... initialisations (they rewrite the base),
other LoRA variants, AdaLoRA, LoHa, LoKr, IA3, VeRA, prompt learning, layer replication, ``target_parameters``.

This module never imports ``peft`` at import time; PEFT objects are recognised by their attributes and classes are
imported lazily only when a PEFT model is present.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ssah_plugin.core.plan import FrozenSlice
from ssah_plugin.errors import UnsupportedSetupError, require

__all__ = [
    "adapter_slices",
    "check_peft_setup",
    "saved_copies",
    "saved_copy_slices",
    "is_adapter_dir",
    "merge_adapter_state",
    "compare_frozen_units",
    "SUPPORTED_INITS",
]

logger = logging.getLogger(__name__)

#: ``init_lora_weights`` values that leave the base weight untouched and start with ``B = 0`` (``False``: random B,
#: whose frozen rows are zeroed when enforcement starts).
SUPPORTED_INITS: tuple = (True, False, "gaussian")

_LORA_PARAM_PREFIXES = ("lora_A", "lora_B")


# ---------------------------------------------------------------------------------------------------- set-up checks
def _peft_configs(model: nn.Module) -> dict:
    """``{adapter_name: config}`` of the PEFT model inside ``model`` (DDP / DeepSpeed wrappers looked through).

    Found on ``PeftModel`` / the tuner, and on a transformers model that got its adapters from
    ``model.add_adapter(config)`` (transformers' PEFT integration keeps the configs in ``model.peft_config``).
    ``peft.inject_adapter_in_model`` keeps no config at all: a base-rewriting initialisation there is caught by the
    base-value check (:func:`ssah_plugin.core.digest.check_base_values`), which sees the rewritten base weights.
    """
    for m in model.modules():
        if not type(m).__module__.startswith("peft.") and not getattr(m, "_hf_peft_config_loaded", False):
            continue
        try:  # PeftModel (a property for prompt learning) and the tuner (LoraModel) both hold it
            cfg = getattr(m, "peft_config", None)
        except AttributeError:
            cfg = None
        if isinstance(cfg, dict) and cfg:
            return cfg
    return {}


def _fix_hint() -> str:
    return ("Fix: use plain LoRA (peft.LoraConfig with init_lora_weights=True or 'gaussian', use_dora=False), or full "
            "fine-tuning, or train without the mask.")


def check_peft_setup(model: nn.Module) -> None:
    """Refuse PEFT configurations whose weight change is not ``s · B @ A`` on an unchanged base weight.

    Called by :func:`ssah_plugin.core.plan.plan_frozen_slices`, i.e. when enforcement is set up
    (``SSAHCallback.on_train_begin``), before the first forward. A model without PEFT passes untouched.

    Raises:
        UnsupportedSetupError: naming the adapter, the offending option and the fix.
    """
    _check_configs(_peft_configs(model))


def _check_configs(configs: dict) -> None:
    for adapter, cfg in configs.items():
        ptype = str(getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", None)))
        if ptype != "LORA":
            raise UnsupportedSetupError(
                f"PEFT method {ptype} (adapter {adapter!r}) is not supported by ssah-plugin: its weight change is not "
                "a low-rank product B @ A on an unchanged base weight, so frozen units cannot be kept exact. "
                + _fix_hint())
        problems: list[str] = []
        if getattr(cfg, "use_dora", False):
            problems.append("use_dora=True (DoRA rescales every output row through its magnitude vector, so a "
                            "frozen row changes when other rows train)")
        init = getattr(cfg, "init_lora_weights", True)
        if not any(init is s or (isinstance(s, str) and init == s) for s in SUPPORTED_INITS):
            problems.append(f"init_lora_weights={init!r} (this initialisation rewrites the base weight or starts "
                            "with a non-zero B @ A computed from it; supported: True, False, 'gaussian')")
        for f in dataclasses.fields(cfg):
            if f.metadata.get("is_lora_variant") and f.name != "use_dora" and getattr(cfg, f.name, None):
                problems.append(f"{f.name}={getattr(cfg, f.name)!r} (a LoRA variant whose weight change is not "
                                "plain B @ A)")
        for name, why in (("use_qalora", "quantization-aware LoRA pools the input channels"),
                          ("layer_replication", "replicated layers share base weights under new names"),
                          ("target_parameters", "LoRA on raw nn.Parameters is not resolved by unit"),
                          ("megatron_config", "tensor-parallel LoRA layers are not supported")):
            if getattr(cfg, name, None):
                problems.append(f"{name}={getattr(cfg, name)!r} ({why})")
        if problems:
            raise UnsupportedSetupError(
                f"LoRA adapter {adapter!r} uses options ssah-plugin cannot keep frozen units exact under: "
                + "; ".join(problems) + ". " + _fix_hint())


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # a module with base_layer that is not from PEFT
        return None
    return LoraLayer


def _check_layer(module: nn.Module, name: str) -> None:
    """Refuse a tuner layer that is not a plain LoRA layer with ``B @ A`` updates."""
    lora_layer = _lora_layer_class()
    cls = type(module).__name__
    if lora_layer is None or not isinstance(module, lora_layer):
        raise UnsupportedSetupError(
            f"{name} is wrapped by {cls}, an adapter layer that is not plain LoRA (LoHa, LoKr, IA3, VeRA, OFT, BOFT "
            "and other PEFT methods change the weight in ways ssah-plugin cannot restrict to unfrozen units). "
            + _fix_hint())
    variants = getattr(module, "lora_variant", {}) or {}
    if variants:
        kinds = ", ".join(f"{a}: {type(v).__name__}" for a, v in sorted(variants.items()))
        raise UnsupportedSetupError(
            f"{name} uses a LoRA variant ({kinds}); DoRA and the other variants change the weight beyond B @ A, so "
            "frozen units cannot be kept exact. " + _fix_hint())
    extra = sorted({pn.split(".")[0] for pn, _ in module.named_parameters()
                    if not pn.startswith("base_layer.") and pn.split(".")[0] not in _LORA_PARAM_PREFIXES})
    if extra:
        raise UnsupportedSetupError(
            f"{name} is a {cls} with adapter parameters {extra} besides lora_A / lora_B (AdaLoRA's lora_E, DoRA's "
            "magnitude vector, embedding LoRA, ...): only plain LoRA is supported. " + _fix_hint())
    if getattr(module, "merged_adapters", None):
        raise UnsupportedSetupError(
            f"{name} has merged adapters {list(module.merged_adapters)}: the base weight no longer holds the values "
            "the mask protects. Fix: call model.unmerge_adapter() (or reload the base) before training.")


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def _check_zero(module: nn.Module, adapter: str, role: str, idx: torch.Tensor, name: str) -> None:
    """Warn when an adapter already changes frozen units (``B @ A`` non-zero there).

    That happens with ``init_lora_weights=False`` (random ``B``) or an adapter trained without the mask. A zero
    ``B`` (the default initialisation) passes even though ``A``'s frozen columns are non-zero: zeroing those
    columns at attach leaves the model's function unchanged.
    """
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    bias = getattr(module.lora_B[adapter], "bias", None)
    if any(hasattr(p, "ds_id") or p.numel() == 0 for p in (a, b)):
        return  # ZeRO-3 partitions: values are not local; the DeepSpeed engine applies the fill
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


# ---------------------------------------------------------------------------------------------------- LoRA layers
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
        UnsupportedSetupError: the layer is not plain LoRA, uses a variant (DoRA, ...), or is merged.
    """
    _check_layer(module, name)
    module_path, _, pname = name.rpartition(".")
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
                    + _fix_hint())
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
    """PEFT's ``ModulesToSaveWrapper`` (recognised by its sub-modules, without importing PEFT)."""
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
    if original is not None and not hasattr(original[0], "ds_id"):
        ref = original[0].detach().index_select(axis, original[1])
        for s in out:
            if s.meta["modules_to_save"] and not hasattr(s.param, "ds_id") and s.param.shape == original[0].shape \
                    and not torch.equal(s.param.detach().index_select(axis, s.index).to(ref.dtype), ref):
                warnings.warn(
                    f"ssah-plugin: modules_to_save copy {s.name} already differs from the base on frozen units (was it "
                    "trained without the mask?); they are kept at their current values, not the base's.",
                    RuntimeWarning, stacklevel=3)
    return out


# ---------------------------------------------------------------------------------------------------- adapters on disk
def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a PEFT adapter directory (``adapter_config.json`` present)."""
    return Path(path, "adapter_config.json").is_file()


def merge_adapter_state(base: str | os.PathLike | nn.Module, adapter_dir: str | os.PathLike, *,
                        dtype: torch.dtype | str = "auto") -> nn.Module:
    """Load ``adapter_dir`` onto ``base`` (a model directory or a loaded model) and return the merged model.

    The adapter's configuration is checked with :func:`check_peft_setup` first (a DoRA or PiSSA adapter is refused,
    since its merge is not ``W + s · B @ A``). The merge is PEFT's ``merge_and_unload``, so what is verified is
    exactly what users deploy. ``dtype="auto"`` loads the base in its checkpoint dtype, so the merge happens in the
    precision users deploy. When ``base`` is a model object it is modified in place (PEFT injects into it).

    Used by ``ssah-plugin verify --base BASE --tuned ADAPTER_DIR`` to check an adapter against its base.
    """
    peft = require("peft", "peft", "verifying a LoRA adapter")
    if not is_adapter_dir(adapter_dir):
        raise UnsupportedSetupError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json); pass "
                                    "the directory written by model.save_pretrained() / trainer.save_model()")
    if isinstance(base, nn.Module):
        model = base
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    cfg = peft.PeftConfig.from_pretrained(str(adapter_dir))
    _check_configs({"default": cfg})
    wrapped = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    check_peft_setup(wrapped)
    for mod in wrapped.modules():
        if isinstance(getattr(mod, "base_layer", None), nn.Module):
            _check_layer(mod, type(mod).__name__)
    logger.info("merging adapter %s into its base", adapter_dir)
    return wrapped.merge_and_unload()


@torch.no_grad()
def compare_frozen_units(mask, base: nn.Module, tuned: nn.Module, policy: str | None = None) -> dict:
    """Compare two plain (merged) models slice by slice: which frozen slices differ, how many unfrozen ones moved.

    Returns ``{"mismatched": [slice names whose frozen entries are not bitwise equal], "changed_unfrozen": number
    of unit slices whose unfrozen entries changed, "checked": number of frozen slices compared}``. Both models must
    be plain transformers models (``merge_and_unload`` output, not a ``PeftModel``).
    """
    from ssah_plugin.core.plan import find_weight
    from ssah_plugin.core.units import unwrap_model

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
