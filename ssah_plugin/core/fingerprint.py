"""Which model a mask was made for: the config hash and the weight fingerprint, and the one fingerprint check.

A mask records 32 fixed samples of every distinct unit-bearing tensor of the model it was made from
(:func:`fingerprint_samples`). :func:`fingerprint_mismatches` compares them with the samples of other weights; it
serves both :meth:`ssah_plugin.core.mask.Mask.validate` (a live model, at set-up of enforcement) and
:func:`ssah_plugin.evaluation.verify.verify_checkpoint` (a base checkpoint read from disk).

The fingerprint tells *another model* from the mask's (cheap, tolerant of dtype rounding and fine-tuning); the exact
check that frozen values are the base's is the per-unit digest of :mod:`ssah_plugin.core.digest`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Mapping

import torch
from torch import nn

from ssah_plugin.core.units import unwrap_model

__all__ = ["N_SAMPLES", "FINGERPRINT_MIN_COSINE", "config_hash", "fingerprint_samples", "samples_match",
           "fingerprint_mismatches"]

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


def fingerprint_samples(tensor: torch.Tensor) -> torch.Tensor:
    """32 deterministic samples of a tensor's flattened values, as float32 (cheap; no full copy)."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    pos = torch.linspace(0, max(n - 1, 0), N_SAMPLES).round().to(torch.int64).to(flat.device)
    return flat[pos].to(torch.float32).cpu()


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
        get: returns the full current tensor for a name, or ``None`` to skip it (absent here, packed quantized
            weights whose samples are not comparable, a ZeRO-3 shard not gathered). Called once per name, in order.
    """
    differ = []
    for name, ref in fingerprint.items():
        cur = get(name)
        if cur is not None and not samples_match(ref, fingerprint_samples(cur)):
            differ.append(name)
    return differ
