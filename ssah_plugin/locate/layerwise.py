"""Layer-by-layer locate for models that do not fit in memory (Wanda / FLAP style).

:func:`locate_layerwise` builds the model skeleton with no weights (``accelerate.init_empty_weights``: parameters
on the meta device, buffers such as rotary frequencies real), loads only the non-layer weights it needs (the
embeddings and whatever sits before the first layer), and records, with every decoder layer replaced by a
pass-through recorder, the exact keyword arguments each layer receives for each calibration batch (attention masks,
rotary embeddings, per-layer-type masks of Gemma-2/3). It then walks the layers: load layer ``i``'s weights lazily
from the safetensors shards, run the safety and utility hidden states through it with the statistics hooks of
:mod:`ssah_plugin.locate.stats`, compute the scores, and drop the weights again. Peak memory is about one layer plus the
calibration activations (``samples x tokens x hidden`` per data set), and the scores equal whole-model mode
(same operations on the same inputs; tested bitwise on tiny models, single file and sharded).

Hooks run during each layer's forward call; nothing runs backward.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Sequence

import torch
from torch import nn

from ssah_plugin.core.mask import Mask, fingerprint_samples
from ssah_plugin.core.units import _layers, describe_units, find_arch_spec
from ssah_plugin.errors import DataError, UnsupportedSetupError
from ssah_plugin.io.checkpoint import SafetensorsCheckpoint
from ssah_plugin.io.models import max_positions, pad_id_of, resolve_device
from ssah_plugin.locate.config import LocateConfig
from ssah_plugin.locate.inputs import prepare_data
from ssah_plugin.locate.scores import build_mask, channel_scores, unit_scores
from ssah_plugin.locate.stats import StatsCollector, counted_batches, progress_bar

__all__ = ["locate_layerwise", "checkpoint_bytes", "memory_available"]

logger = logging.getLogger(__name__)


def _itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per element of a stored dtype (a safetensors code such as ``"F8_E4M3"`` when torch has no match)."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    bits = re.search(r"\d+", dtype)
    return max(int(bits.group()) // 8, 1) if bits else 4


def open_weights(folder: str | os.PathLike) -> SafetensorsCheckpoint:
    """The checkpoint reader for layer-by-layer mode (:class:`ssah_plugin.io.checkpoint.SafetensorsCheckpoint`),
    with the set-up error this mode gives for a folder without safetensors weights."""
    try:
        return SafetensorsCheckpoint(folder)
    except DataError as exc:
        raise UnsupportedSetupError(
            f"layer-by-layer locate reads safetensors weights only: {exc}. Convert once: "
            "AutoModelForCausalLM.from_pretrained(...).save_pretrained(out, safe_serialization=True), or pass "
            "--layerwise off"
        ) from None


def checkpoint_bytes(folder: str | os.PathLike, itemsize: int | None = None) -> int | None:
    """Bytes the checkpoint's weights take in memory (with ``itemsize`` bytes per element if given); None if the
    folder holds no readable safetensors weights."""
    try:
        ckpt = SafetensorsCheckpoint(folder)
    except DataError:
        return None
    total = 0
    for k in ckpt.keys():
        n = 1
        for d in ckpt.shape(k):
            n *= d
        total += n * (itemsize or _itemsize(ckpt.dtype(k)))
    return total


def memory_available(device: torch.device) -> int | None:
    """Free bytes on ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the call's extra arguments and returns the hidden states unchanged."""

    def __init__(self, layer: nn.Module, calls: list) -> None:
        super().__init__()
        self.layer = layer
        self.calls = calls

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)  # e.g. Gemma's decoder_layer.attention_type

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((args[1:], kwargs))
        return hidden


def _set_param(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, pname = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    mod._parameters[pname] = nn.Parameter(value, requires_grad=False)


def _load_params(root: nn.Module, names: Sequence[str], reader: SafetensorsCheckpoint, device, dtype,
                 what: str) -> dict[str, torch.Tensor]:
    missing, loaded = [], {}
    for name in names:
        if reader.resolve(name) is None:
            missing.append(name)
            continue
        t = reader.get(name)
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        _set_param(root, name, t)
        loaded[name] = t
    if missing:
        raise UnsupportedSetupError(
            f"layer-by-layer locate: the checkpoint lacks {len(missing)} weight(s) of {what} (first: {missing[0]}). "
            "The folder may hold another architecture or renamed keys; run whole-model mode (--layerwise off)"
        )
    return loaded


@torch.no_grad()
def locate_layerwise(folder: str | os.PathLike, tokenizer=None, *, safety, utility,
                     config: LocateConfig | None = None) -> Mask:
    """:func:`ssah_plugin.locate.runner.locate` for a local safetensors checkpoint, one decoder layer in memory at a
    time.

    Not available with ``own_refusals`` or ``auto`` (both need the whole model to generate text).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = config or LocateConfig()
    if cfg.own_refusals or cfg.auto:
        raise UnsupportedSetupError(
            "own_refusals and auto mode generate text with the whole model, which layer-by-layer mode never holds; "
            "generate the refusals / choose the sizes on a machine that fits the model, or pass --layerwise off"
        )
    if cfg.decision_units:
        raise UnsupportedSetupError("decision units need the whole model in memory; pass --layerwise off, or drop "
                                    "--decision-units")
    folder = str(folder)
    device = resolve_device(cfg.device)
    hf_config = AutoConfig.from_pretrained(folder)
    if cfg.dtype:
        dtype = getattr(torch, cfg.dtype)
    elif device.type == "cpu":
        dtype = torch.float32
    else:
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.eval()
    _, spec = find_arch_spec(model)
    layers_path, layers = _layers(model, spec)
    for mod in model.modules():  # rotary frequencies and other real buffers go to the device
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.device.type != "meta":
                mod._buffers[bname] = buf.to(device)
    groups = describe_units(model, cfg.granularity)
    reader = open_weights(folder)
    body = getattr(model, "base_model", model)
    body_prefix = next((n for n, m in model.named_modules() if m is body), "")
    layer_prefix = layers_path + "."
    # weights outside the decoder layers that the body uses (embeddings, final norm); never the LM head
    outer = [n for n, _ in model.named_parameters()
             if not n.startswith(layer_prefix) and (not body_prefix or n.startswith(body_prefix + "."))]
    _load_params(model, outer, reader, device, dtype, "the embeddings")

    data = prepare_data(model, tokenizer, safety, utility, cfg, max_positions(model))
    pad = pad_id_of(tokenizer)
    # ---- record each layer's inputs, per data set and batch ------------------------------------------------------
    calls = [[] for _ in range(len(layers))]
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Recorder(originals[i], calls[i])
    sets: dict[str, dict] = {}
    try:
        for what, enc in (("safety", data.safety), ("utility", data.utility)):
            hidden, selects = [], []
            first = len(calls[0])
            for ids, att, index in counted_batches(enc, cfg.batch_size, pad, device):
                captured: list = []
                h0 = layers[0].register_forward_pre_hook(
                    lambda m, a, k, out=captured: out.append(a[0] if a else k["hidden_states"]), with_kwargs=True)
                try:
                    body(input_ids=ids, attention_mask=att, use_cache=False)
                finally:
                    h0.remove()
                hidden.append(captured[0])
                selects.append(index)
            sets[what] = {"hidden": hidden, "select": selects, "first": first}
    finally:
        for i in range(len(layers)):
            layers[i] = originals[i]
    # ---- walk the layers ---------------------------------------------------------------------------------------
    by_layer: dict[int, list[int]] = {}
    for gi, g in enumerate(groups):
        by_layer.setdefault(g.layer, []).append(gi)
    raw = {"safety": [None] * len(groups), "utility": [None] * len(groups)}
    fingerprint: dict[str, torch.Tensor] = {}
    for li in progress_bar(range(len(layers)), len(layers), "locate layers", cfg.progress):
        layer = layers[li]
        names = [f"{layers_path}.{li}.{n}" for n, _ in layer.named_parameters()]
        loaded = _load_params(model, names, reader, device, dtype, f"layer {li}")
        lgroups = [groups[gi] for gi in by_layer.get(li, [])]
        for what in ("safety", "utility"):
            st = sets[what]
            collector = StatsCollector(model, lgroups)
            with collector:
                for b, h in enumerate(st["hidden"]):
                    args, kwargs = calls[li][st["first"] + b]
                    collector.select = st["select"][b]
                    out = layer(h, *args, **kwargs)
                    st["hidden"][b] = out[0] if isinstance(out, tuple) else out
            for gi in by_layer.get(li, []):
                g = groups[gi]
                w = loaded[f"{g.score_module}.weight"]
                raw[what][gi] = unit_scores(g, channel_scores(collector.variance(g.score_module), w,
                                                               g.score_layout))
        for gi in by_layer.get(li, []):
            for s in groups[gi].slices:
                if s.name not in fingerprint and s.name in loaded:
                    fingerprint[s.name] = fingerprint_samples(loaded[s.name])
        layer.to("meta")  # drop the weights
        del loaded  # the reader keeps no file open between reads: nothing of this layer stays mapped
    order = []
    for g in groups:  # first-appearance order, as Mask.empty_for
        for s in g.slices:
            if s.name not in order:
                order.append(s.name)
    fingerprint = {n: fingerprint[n] for n in order if n in fingerprint}
    return build_mask(model, groups, raw["safety"], raw["utility"], cfg, fingerprint=fingerprint,
                      method_extra={"data": data.info, "mode": "layer-by-layer"})
