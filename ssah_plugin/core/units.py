"""Architecture knowledge: which weight slices a structured unit owns.

A *unit* is channel ``j`` of a depth-2 module ``f(X) = B · σ(A · X)`` (method notes, "What a unit is"):

* **MLP neuron** ``j``: row ``j`` of every input projection (``gate_proj``/``up_proj``, fused ``gate_up_proj``,
  GPT-2 ``c_fc``) plus its bias entry, and column ``j`` of the output projection (``down_proj``, GPT-2 ``c_proj``).
* **Attention output channel** ``j``: column ``j`` of ``o_proj`` and the row of the value projection that feeds it
  (with grouped-query attention that value row is shared by several query heads; freezing it freezes a superset,
  which is always safe). ``granularity="head"`` groups the ``head_dim`` channels of one head into one unit.

Embeddings, norms and ``lm_head`` are never units.

Everything here is pure description: :func:`describe_units` turns a model into a list of :class:`UnitGroup`, each
listing, per weight tensor, which indices along which axis belong to each unit. The mask file stores exactly this
mapping, so enforcement never needs architecture knowledge again.

Supported ``config.model_type`` values are the keys of :data:`ARCHITECTURES` (:mod:`ssah_plugin.core.arch`, whose
names are re-exported here). For anything else, describe the
layout with an :class:`ArchSpec` and call :func:`register_architecture` (see README, "Other architectures")::

    from ssah_plugin.core.units import ArchSpec, register_architecture
    register_architecture("my_model", ArchSpec(layers="model.decoder.layers", mlp="ffn",
                                               mlp_in=("fc1",), mlp_out="fc2",
                                               attn="self_attn", attn_v="v_proj", attn_out="out_proj"))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ssah_plugin.core.arch import ARCHITECTURES, ArchSpec, Layout, find_arch_spec, register_architecture, unwrap_model
from ssah_plugin.core.peft_layout import base_module
from ssah_plugin.errors import UnsupportedArchitectureError

__all__ = [
    "ArchSpec",
    "SliceMap",
    "UnitGroup",
    "ARCHITECTURES",
    "register_architecture",
    "describe_units",
    "unwrap_model",
    "find_arch_spec",
]

Granularity = Literal["channel", "head"]


@dataclass
class SliceMap:
    """The slices of one weight tensor owned by the units of a group.

    ``index[u]`` lists the indices along ``axis`` of ``module.param`` that belong to unit ``u``.
    ``role`` is ``"out"`` when the axis indexes the module's outputs (rows of a Linear weight, a bias) and ``"in"``
    when it indexes its inputs (columns of a Linear weight); adapters (LoRA) need the role, not the physical axis.
    """

    module: str
    param: str
    axis: int
    role: Literal["in", "out"]
    index: torch.Tensor  # int64 [n_units, k]
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}"


@dataclass
class UnitGroup:
    """The units of one depth-2 module (one MLP or one attention block of one layer)."""

    name: str
    kind: Literal["mlp", "attn"]
    layer: int
    n_units: int
    granularity: Granularity
    score_module: str  # module B whose input channels are measured (down_proj / o_proj / c_proj)
    score_layout: Layout
    channels_per_unit: int
    slices: list[SliceMap] = field(default_factory=list)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _weight_of(module: nn.Module) -> torch.Tensor:
    module = base_module(module)  # inside a PEFT tuner layer
    weight = getattr(module, "weight", None)
    if weight is None:
        raise UnsupportedArchitectureError(f"module {type(module).__name__} has no weight")
    shape = getattr(weight, "ds_shape", None)  # DeepSpeed ZeRO-3 placeholder
    return weight if shape is None else torch.empty(tuple(shape), device="meta")


def _has_bias(module: nn.Module) -> bool:
    return getattr(base_module(module), "bias", None) is not None


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _layers(root: nn.Module, spec: ArchSpec) -> tuple[str, nn.ModuleList]:
    for path in spec.layers.split("|"):
        layers = _get(root, path)
        if isinstance(layers, nn.ModuleList):
            return path, layers
    raise UnsupportedArchitectureError(
        f"none of the layer paths {spec.layers!r} exists in {type(root).__name__}; "
        "register a corrected ArchSpec with ssah_plugin.core.units.register_architecture(..., overwrite=True)"
    )


def _join(*parts: str) -> str:
    """Dotted path from parts, skipping empty ones (``ArchSpec(mlp="")`` for projections directly in the layer)."""
    return ".".join(p for p in parts if p)


def _idx(n_units: int, per_unit: torch.Tensor) -> torch.Tensor:
    return per_unit.reshape(n_units, -1).to(torch.int64).contiguous()


def _channel_slices(
    module_path: str,
    module: nn.Module,
    role: Literal["in", "out"],
    layout: Layout,
    channel_index: torch.Tensor,
    with_bias: bool,
) -> list[SliceMap]:
    """Slices of ``module`` for units whose channels along ``role`` are ``channel_index`` ([n_units, k])."""
    weight = _weight_of(module)
    # Linear weight is [out, in]; Conv1D weight is [in, out].
    axis = (0 if role == "out" else 1) if layout == "linear" else (1 if role == "out" else 0)
    out = [SliceMap(module_path, "weight", axis, role, channel_index, tuple(weight.shape))]
    if with_bias and role == "out" and _has_bias(module):
        out_dim = weight.shape[0] if layout == "linear" else weight.shape[1]
        out.append(SliceMap(module_path, "bias", 0, "out", channel_index, (out_dim,)))
    return out


def describe_units(model: nn.Module, granularity: Granularity = "channel") -> list[UnitGroup]:
    """List every unit group of ``model`` with the weight slices each unit owns.

    Args:
        model: a transformers causal LM (wrappers such as DDP, DeepSpeed or PEFT are looked through).
        granularity: ``"channel"`` makes every attention output channel a unit; ``"head"`` makes every attention
            head a unit. MLP units are always single neurons.

    Returns:
        One :class:`UnitGroup` per MLP block and per attention block, layer by layer (MLP before attention).

    Raises:
        UnsupportedArchitectureError: the architecture is unknown or does not have the expected modules.

    Example:
        >>> groups = describe_units(model)                         # doctest: +SKIP
        >>> groups[0].name, groups[0].n_units                      # doctest: +SKIP
        ('model.layers.0.mlp', 64)
    """
    if granularity not in ("channel", "head"):
        raise ValueError(f"granularity must be 'channel' or 'head', got {granularity!r}")
    root = unwrap_model(model)
    model_type, spec = find_arch_spec(root)
    config = _text_config(root.config)
    layers_path, layers = _layers(root, spec)
    n_heads = int(getattr(config, "num_attention_heads", getattr(config, "n_head", 0)) or 0)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    groups: list[UnitGroup] = []
    for li, layer in enumerate(layers):
        prefix = f"{layers_path}.{li}"
        # ---- MLP neurons -------------------------------------------------------------------------------------
        mlp_path = _join(prefix, spec.mlp)
        out_path = _join(mlp_path, spec.mlp_out)
        out_mod = _get(root, out_path)
        if out_mod is None:
            raise UnsupportedArchitectureError(f"{model_type}: expected MLP output projection at {out_path!r}")
        w_out = _weight_of(out_mod)
        n = w_out.shape[1] if spec.layout == "linear" else w_out.shape[0]
        ar = torch.arange(n)
        g = UnitGroup(mlp_path, "mlp", li, n, "channel", out_path, spec.layout, 1)
        for name in spec.mlp_in:
            name, _, times = name.partition("*")
            blocks = int(times or 1)
            path = _join(mlp_path, name)
            mod = _get(root, path)
            if mod is None:
                raise UnsupportedArchitectureError(f"{model_type}: expected MLP input projection at {path!r}")
            w = _weight_of(mod)
            out_dim = w.shape[0] if spec.layout == "linear" else w.shape[1]
            if out_dim != n * blocks:
                raise UnsupportedArchitectureError(
                    f"{model_type}: {path} has {out_dim} outputs, expected {blocks} x {n} (the MLP width)"
                )
            index = torch.stack([ar + b * n for b in range(blocks)], dim=1)
            g.slices += _channel_slices(path, mod, "out", spec.layout, _idx(n, index), with_bias=True)
        g.slices += _channel_slices(out_path, out_mod, "in", spec.layout, _idx(n, ar), with_bias=False)
        groups.append(g)
        # ---- attention output channels -----------------------------------------------------------------------
        attn_path = _join(prefix, spec.attn)
        o_path = _join(attn_path, spec.attn_out)
        v_path = _join(attn_path, spec.attn_v)
        o_mod, v_mod = _get(root, o_path), _get(root, v_path)
        if o_mod is None or v_mod is None:
            raise UnsupportedArchitectureError(
                f"{model_type}: expected attention projections at {o_path!r} and {v_path!r}"
            )
        w_o = _weight_of(o_mod)
        d = w_o.shape[1] if spec.layout == "linear" else w_o.shape[0]
        if n_heads <= 0 or d % n_heads:
            raise UnsupportedArchitectureError(
                f"{model_type}: cannot split {d} attention channels into {n_heads} heads (config.num_attention_heads)"
            )
        head_dim = d // n_heads
        if n_kv <= 0 or n_heads % n_kv:
            raise UnsupportedArchitectureError(f"{model_type}: {n_heads} heads are not a multiple of {n_kv} KV heads")
        ch = torch.arange(d)
        head = ch // head_dim
        v_row = (head // (n_heads // n_kv)) * head_dim + ch % head_dim  # value row feeding channel j
        w_v = _weight_of(v_mod)
        v_out = w_v.shape[0] if spec.layout == "linear" else w_v.shape[1]
        fused = v_out != n_kv * head_dim
        if fused:  # q, k, v stacked: value block last
            offset = v_out - n_kv * head_dim
            if offset != d + n_kv * head_dim:
                raise UnsupportedArchitectureError(
                    f"{model_type}: fused projection {v_path} has {v_out} outputs; cannot locate the value block"
                )
            v_row = v_row + offset
        if granularity == "head":
            n_units, k = n_heads, head_dim
        else:
            n_units, k = d, 1
        g = UnitGroup(attn_path, "attn", li, n_units, granularity, o_path, spec.layout, k)
        g.slices += _channel_slices(v_path, v_mod, "out", spec.layout, _idx(n_units, v_row), with_bias=True)
        g.slices += _channel_slices(o_path, o_mod, "in", spec.layout, _idx(n_units, ch), with_bias=False)
        groups.append(g)
    return groups
