"""Regenerate ``tests/golden/mask_v2.safetensors``, the file that pins mask format version 2.

    python tests/golden/make_golden.py

Only regenerate on purpose (a new format version gets a new golden file). ``mask_v1.safetensors`` pins format
version 1: it was written by ssah-plugin 0.1 from the same mask and is never regenerated (this release writes
version 2 only); it must stay readable. The mask is built from ``tiny_model("llama", seed=0)`` with a few frozen
units and hand-set scores and classes, so every field of the format is present (v2 adds the base-value digests
and the checksum).
"""
from __future__ import annotations

from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GOLDEN_V1 = HERE / "mask_v1.safetensors"  # format version 1, kept as written by ssah-plugin 0.1
GOLDEN = HERE / "mask_v2.safetensors"
FROZEN = {"model.layers.0.mlp": [0, 5, 127], "model.layers.1.self_attn": [3, 4, 63]}
LIBRARY_VERSION = "0.1.0"  # written into the golden file, independent of the installed version


def build_golden_mask():
    """The golden mask, built today from the tiny llama (deterministic)."""
    from ssah_plugin.core.mask import Mask
    from ssah_plugin.io.tiny import tiny_model

    model = tiny_model("llama", seed=0)
    mask = Mask.from_units(model, FROZEN)
    mask.library_version = LIBRARY_VERSION
    mask.method = {"name": "golden", "seed": 0}
    n = [g.n_units for g in mask.groups]
    mask.scores = {
        "safety": [torch.arange(k, dtype=torch.float64) / 8 + gi for gi, k in enumerate(n)],
        "safety_z": [torch.linspace(-2.0, 2.0, k, dtype=torch.float64) for k in n],
    }
    mask.classes = [torch.tensor([i % 4 for i in range(k)], dtype=torch.uint8) for k in n]
    mask.classes[0][1] = 255  # one unknown
    mask.stored["scu-manual"] = [c == 1 for c in mask.classes]
    return mask


if __name__ == "__main__":
    print(build_golden_mask().save(GOLDEN))
