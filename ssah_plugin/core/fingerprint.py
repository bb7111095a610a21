"""Which model a mask was made for: the config hash and the weight fingerprint, and the one fingerprint check.

A mask records 32 fixed samples of every distinct unit-bearing tensor of the model it was made from
(:func:`fingerprint_samples`). :func:`fingerprint_mismatches` compares them with the samples of other weights; it
serves both :meth:`ssah_plugin.core.mask.Mask.validate` (a live model, at set-up of enforcement) and
:func:`ssah_plugin.evaluation.verify.verify_checkpoint` (a base checkpoint read from disk).

The samples sit at fixed flat positions (:func:`fingerprint_positions`, the one definition). A host whose tensors
are partitioned (DeepSpeed ZeRO-3: each rank holds a contiguous range of the flattening) takes the samples of its
own range with :func:`partial_fingerprint_samples` and sums the ranks' 32-vectors; no rank needs the whole tensor.

The fingerprint tells *another model* from the mask's (cheap, tolerant of dtype rounding and fine-tuning); the exact
check that frozen values are the base's is the per-unit digest of :mod:`ssah_plugin.core.digest`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ssah_plugin.core.units import unwrap_model

__all__ = [
    "FINGERPRINT_MIN_COSINE",
    "N_SAMPLES",
    "config_hash",
    "fingerprint_mismatches",
    "fingerprint_positions",
    "fingerprint_samples",
    "partial_fingerprint_samples",
    "samples_match",
]

#: samples per tensor
N_SAMPLES = 32
#: Minimum cosine similarity between a tensor's recorded samples and the live ones. Unrelated weights give a cosine
#: near 0 (about +-0.2 for 32 samples); the same weights in bf16, or after fine-tuning that keeps them recognisable
#: (resumed checkpoints, typical learning rates), stay far above 0.5.
FINGERPRINT_MIN_COSINE = 0.5
_CONFIG_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
)


def config_hash(model: nn.Module) -> str:
    """sha256 over the structural fields of the model's (text) config: equal configs give equal hashes."""
    root = unwrap_model(model)
    cfg = root.config
    get = getattr(cfg, "get_text_config", None)
    text = get() if callable(get) else cfg
    fields = {k: getattr(text, k, None) for k in _CONFIG_FIELDS}
    fields["model_type"] = getattr(cfg, "model_type", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_positions(numel: int) -> torch.Tensor:
    """The :data:`N_SAMPLES` flat positions sampled in a tensor of ``numel`` elements (int64, on the CPU).

    Evenly spaced from the first element to the last, computed as masks have always been made (a float32
    ``linspace``, rounded), so the samples of existing masks keep their meaning. Above 2**24 elements float32 cannot
    hold every position and the last one may round past the end; it is clamped to the last element (such tensors
    could not be fingerprinted before). A tensor of exactly :data:`N_SAMPLES` elements is its own sample set
    (positions ``0 .. N_SAMPLES - 1``).
    """
    if numel <= 0:
        raise ValueError(f"cannot fingerprint an empty tensor (numel {numel})")
    pos = torch.linspace(0, numel - 1, N_SAMPLES).round().to(torch.int64)
    return pos.clamp_(max=numel - 1)


def fingerprint_samples(tensor: torch.Tensor) -> torch.Tensor:
    """32 deterministic samples of a tensor's flattened values, as float32 on the CPU (cheap; no full copy)."""
    flat = tensor.detach().reshape(-1)
    return flat[fingerprint_positions(flat.numel()).to(flat.device)].to(torch.float32).cpu()


def partial_fingerprint_samples(local: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """The fingerprint samples that fall into one contiguous range of a partitioned tensor, zeros elsewhere.

    Args:
        local: the values this process holds, elements ``[start, start + local.numel())`` of the tensor's flattening
            (trailing padding past ``numel`` allowed: no position falls there).
        start: flat offset of ``local[0]`` in the whole tensor.
        numel: element count of the whole (logical) tensor.

    Returns:
        A float32 vector of :data:`N_SAMPLES` on ``local``'s device. When the ranges of all processes cover the
        tensor once, the sum of their vectors is :func:`fingerprint_samples` of the whole tensor, bit for bit
        (every position is held by exactly one range; the others add ``0.0``, which is exact).
    """
    pos = fingerprint_positions(numel).to(local.device)
    flat = local.detach().reshape(-1)
    rel = pos - int(start)
    here = (rel >= 0) & (rel < flat.numel())
    out = torch.zeros(N_SAMPLES, dtype=torch.float32, device=flat.device)
    out[here] = flat[rel[here]].to(torch.float32)
    return out


def samples_match(ref: torch.Tensor, cur: torch.Tensor) -> bool:
    """Same weights up to dtype rounding or fine-tuning: cosine similarity of the samples above the threshold.

    A reference that is all zeros (e.g. biases of a freshly initialised model) carries no information and always
    matches: after a few steps of training it is no longer zero, and that must not read as "other weights".
    """
    a, b = ref.double(), cur.double()
    na, nb = a.norm(), b.norm()
    if na == 0:
        return True
    if nb == 0 or not torch.isfinite(nb):
        return False
    return bool((a @ b) / (na * nb) > FINGERPRINT_MIN_COSINE)


def fingerprint_mismatches(fingerprint: Mapping[str, torch.Tensor],
                           get: Callable[[str], torch.Tensor | None]) -> list[str]:
    """Names of the fingerprinted tensors whose current values are other weights than the recorded ones.

    Args:
        fingerprint: tensor name -> recorded samples (``Mask.fingerprint``).
        get: returns the full current tensor for a name, or its :data:`N_SAMPLES` samples already taken (a host
            that holds only a partition, see :func:`partial_fingerprint_samples`; such a vector is its own sample
            set), or ``None`` to skip it (absent here, packed quantized weights whose samples are not comparable).
            Called once per name, in order.
    """
    differ = []
    for name, ref in fingerprint.items():
        cur = get(name)
        if cur is not None and not samples_match(ref, fingerprint_samples(cur)):
            differ.append(name)
    return differ
