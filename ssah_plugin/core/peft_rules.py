"""Which PEFT set-ups keep frozen units exact: plain LoRA only (framework-free rules; ``peft`` is never imported).

Frozen units stay exact under an adapter whose weight change is ``s · B @ A`` on an unchanged base weight
(:mod:`ssah_plugin.core.peft_layout`). Everything else is refused at set-up, before the first forward: DoRA,
PiSSA / OLoRA / LoftQ / CorDA / ... initialisations (they rewrite the base), other LoRA variants, AdaLoRA, LoHa,
LoKr, IA3, VeRA, prompt learning, layer replication, ``target_parameters``.

The rules read PEFT configuration objects and tuner layers by their documented fields and sub-modules; they serve
the hosts (:func:`ssah_plugin.hosts.peft.check_peft_setup`, which finds the configurations and checks layer classes
with ``peft`` itself), adapter merging (:func:`ssah_plugin.io.adapters.merge_adapter_state`) and planning
(:func:`ssah_plugin.core.peft_layout.adapter_slices`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from torch import nn

from ssah_plugin.errors import UnsupportedSetupError

__all__ = ["SUPPORTED_INITS", "LORA_PARAM_PREFIXES", "fix_hint", "check_lora_configs", "check_lora_layer",
           "refuse_layer_class"]

#: ``init_lora_weights`` values that leave the base weight untouched and start with ``B = 0`` (``False``: random B,
#: whose frozen rows are zeroed when enforcement starts).
SUPPORTED_INITS: tuple = (True, False, "gaussian")
#: the adapter parameters of a plain LoRA layer
LORA_PARAM_PREFIXES = ("lora_A", "lora_B")


def fix_hint() -> str:
    return ("Fix: use plain LoRA (peft.LoraConfig with init_lora_weights=True or 'gaussian', use_dora=False), or full "
            "fine-tuning, or train without the mask.")


def check_lora_configs(configs: Mapping[str, object]) -> None:
    """Refuse adapter configurations (``{adapter_name: PeftConfig}``) that are not plain LoRA on an unchanged base.

    Raises:
        UnsupportedSetupError: naming the adapter, the offending option and the fix.
    """
    for adapter, cfg in configs.items():
        ptype = str(getattr(getattr(cfg, "peft_type", None), "value", getattr(cfg, "peft_type", None)))
        if ptype != "LORA":
            raise UnsupportedSetupError(
                f"PEFT method {ptype} (adapter {adapter!r}) is not supported by ssah-plugin: its weight change is not "
                "a low-rank product B @ A on an unchanged base weight, so frozen units cannot be kept exact. "
                + fix_hint())
        problems: list[str] = []
        if getattr(cfg, "use_dora", False):
            problems.append("use_dora=True (DoRA rescales every output row through its magnitude vector, so a "
                            "frozen row changes when other rows train)")
        init = getattr(cfg, "init_lora_weights", True)
        if not any(init is s or (isinstance(s, str) and init == s) for s in SUPPORTED_INITS):
            problems.append(f"init_lora_weights={init!r} (this initialisation rewrites the base weight or starts "
                            "with a non-zero B @ A computed from it; supported: True, False, 'gaussian')")
        fields = dataclasses.fields(cfg) if dataclasses.is_dataclass(cfg) else ()
        for f in fields:
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
                + "; ".join(problems) + ". " + fix_hint())


def refuse_layer_class(module: nn.Module, name: str) -> None:
    """Raise the refusal for an adapter layer that is not a plain LoRA layer (``name``: its module path)."""
    raise UnsupportedSetupError(
        f"{name} is wrapped by {type(module).__name__}, an adapter layer that is not plain LoRA (LoHa, LoKr, IA3, "
        "VeRA, OFT, BOFT and other PEFT methods change the weight in ways ssah-plugin cannot restrict to unfrozen "
        "units). " + fix_hint())


def check_lora_layer(module: nn.Module, name: str) -> None:
    """Refuse a tuner layer (a module with ``base_layer``) that is not a plain, unmerged LoRA layer.

    Structural: the layer must hold its factors in ``lora_A`` / ``lora_B`` module dicts, use no LoRA variant, have
    no adapter parameters besides ``lora_A`` / ``lora_B``, and hold no merged adapter. The class check against
    ``peft``'s ``LoraLayer`` is made at set-up by :func:`ssah_plugin.hosts.peft.check_peft_setup`.
    """
    if not (isinstance(module._modules.get("lora_A"), nn.ModuleDict)
            and isinstance(module._modules.get("lora_B"), nn.ModuleDict)):
        refuse_layer_class(module, name)
    cls = type(module).__name__  # for messages only
    variants = getattr(module, "lora_variant", {}) or {}
    if variants:
        kinds = ", ".join(f"{a}: {type(v).__name__}" for a, v in sorted(variants.items()))
        raise UnsupportedSetupError(
            f"{name} uses a LoRA variant ({kinds}); DoRA and the other variants change the weight beyond B @ A, so "
            "frozen units cannot be kept exact. " + fix_hint())
    extra = sorted({pn.split(".")[0] for pn, _ in module.named_parameters()
                    if not pn.startswith("base_layer.") and pn.split(".")[0] not in LORA_PARAM_PREFIXES})
    if extra:
        raise UnsupportedSetupError(
            f"{name} is a {cls} with adapter parameters {extra} besides lora_A / lora_B (AdaLoRA's lora_E, DoRA's "
            "magnitude vector, embedding LoRA, ...): only plain LoRA is supported. " + fix_hint())
    if getattr(module, "merged_adapters", None):
        raise UnsupportedSetupError(
            f"{name} has merged adapters {list(module.merged_adapters)}: the base weight no longer holds the values "
            "the mask protects. Fix: call model.unmerge_adapter() (or reload the base) before training.")
