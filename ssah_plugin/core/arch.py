"""The architecture registry: how each ``config.model_type`` names its depth-2 modules, and model unwrapping.

:func:`ssah_plugin.core.units.describe_units` reads an :class:`ArchSpec` to list the units of a model. Supported
``config.model_type`` values are the keys of :data:`ARCHITECTURES`; for anything else, describe the layout with an
:class:`ArchSpec` and call :func:`register_architecture` (README, "Other architectures").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ssah_plugin.core.peft_layout import loaded_peft
from ssah_plugin.errors import UnsupportedArchitectureError

__all__ = ["ArchSpec", "ARCHITECTURES", "Layout", "register_architecture", "find_arch_spec", "unwrap_model"]

Layout = Literal["linear", "conv1d"]


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture names its depth-2 modules. All paths are dotted attribute paths.

    Attributes:
        layers: path from the model root to the ``nn.ModuleList`` of decoder layers. Several candidates may be
            given separated by ``|``; the first that exists is used.
        mlp: path of the MLP block inside a layer (``""`` when the projections sit directly in the layer, as in
            OPT's ``fc1``/``fc2``).
        mlp_in: input projections of the MLP (``A``), relative to ``mlp``. A fused projection that holds several
            stacked blocks of ``n_units`` rows (Phi-3 ``gate_up_proj``) is written ``"name*2"``.
        mlp_out: output projection of the MLP (``B``); its input channels are the units.
        attn: path of the attention block inside a layer (``""`` allowed, as for ``mlp``).
        attn_v: the value projection (``"v_proj"``), or the fused projection (``"qkv_proj"`` / ``"c_attn"``) whose
            value block follows the query and key blocks.
        attn_out: output projection of the attention (``o_proj``); its input channels are the units.
        layout: ``"linear"`` for ``nn.Linear`` (weight ``[out, in]``) or ``"conv1d"`` for GPT-2's ``Conv1D``
            (weight ``[in, out]``).
    """

    layers: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    attn: str
    attn_v: str
    attn_out: str
    layout: Layout = "linear"


_LLAMA_LIKE = ArchSpec(
    layers="model.layers|model.language_model.layers|language_model.model.layers",
    mlp="mlp",
    mlp_in=("gate_proj", "up_proj"),
    mlp_out="down_proj",
    attn="self_attn",
    attn_v="v_proj",
    attn_out="o_proj",
)

#: Registry of supported architectures, keyed by ``config.model_type``.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": dataclasses.replace(_LLAMA_LIKE, mlp_in=("gate_up_proj*2",), attn_v="qkv_proj"),
    "gpt2": ArchSpec(
        layers="transformer.h",
        mlp="mlp",
        mlp_in=("c_fc",),
        mlp_out="c_proj",
        attn="attn",
        attn_v="c_attn",
        attn_out="c_proj",
        layout="conv1d",
    ),
}


def register_architecture(model_type: str, spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Teach the library a new architecture (``config.model_type``) before building or loading a mask."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"spec must be an ArchSpec, got {type(spec).__name__}")
    if model_type in ARCHITECTURES and not overwrite:
        raise ValueError(f"architecture {model_type!r} is already registered; pass overwrite=True to replace it")
    ARCHITECTURES[model_type] = spec


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside DDP / DeepSpeed engine / accelerate / PEFT wrappers.

    PEFT's ``PeftModel`` keeps the original model at ``base_model.model`` with the original module names, so the
    mask's module paths resolve unchanged there (PEFT tuner layers are descended into by
    :mod:`ssah_plugin.core.peft_layout`). PEFT models are recognised with ``isinstance`` when the process has
    imported ``peft`` (without it, none can exist); ``peft`` is never imported here.
    """
    peft = loaded_peft()
    peft_models = () if peft is None else \
        (peft.PeftModel, *((peft.PeftMixedModel,) if hasattr(peft, "PeftMixedModel") else ()))
    seen = 0
    while seen < 10:
        seen += 1
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
            model = model.module  # DDP, DeepSpeedEngine
            continue
        base = getattr(model, "base_model", None)
        inner = getattr(base, "model", None)
        if peft_models and isinstance(model, peft_models) and isinstance(inner, nn.Module):
            model = inner  # PeftModel -> LoraModel.model
            continue
        break
    return model


def find_arch_spec(model: nn.Module) -> tuple[str, ArchSpec]:
    """Look up the :class:`ArchSpec` for ``model.config.model_type`` or raise a helpful error."""
    root = unwrap_model(model)
    config = getattr(root, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"{type(root).__name__} has no config.model_type; pass a transformers model, or register an ArchSpec "
            "with ssah_plugin.core.units.register_architecture and give the model a config with that model_type"
        )
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))}). "
            "Describe where its MLP and attention projections live with ssah_plugin.core.units.ArchSpec and call "
            "ssah_plugin.core.units.register_architecture(" + repr(model_type) + ", spec) before building the mask; "
            "see README 'Other architectures'. Mixture-of-experts models are not supported."
        )
    return model_type, spec
