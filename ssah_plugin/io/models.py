"""Model loading and the small model facts every layer asks for (device, pad id, context length).

One implementation of each: locate, evaluation, recipes and the CLI all use these.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssah_plugin.core.units import unwrap_model
from ssah_plugin.errors import DataError

__all__ = ["load_model", "model_device", "pad_id_of", "max_positions", "resolve_device"]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first materialised parameter (meta parameters skipped); the CPU for none."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding positions are always masked out)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def max_positions(model: nn.Module) -> int | None:
    """The model's context length from its (text) config, or ``None`` if the config does not say."""
    cfg = getattr(unwrap_model(model), "config", None)
    get = getattr(cfg, "get_text_config", None)
    cfg = get() if callable(get) else cfg
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``): the first CUDA device if there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Load ``(model, tokenizer)`` from ``tiny:<family>`` (tests), a local folder, or a hub name.

    A folder holding a PEFT adapter (``adapter_config.json``) is merged into the base model its config names
    (:func:`ssah_plugin.hosts.peft.merge_adapter_state`); its tokenizer is the adapter folder's if saved, else the base's.
    """
    spec = str(spec)
    if spec.startswith("tiny:"):
        from ssah_plugin.io.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer

        family = spec.partition(":")[2] or "llama"
        if family not in TINY_FAMILIES:
            raise DataError(f"unknown tiny model {spec!r}; choose tiny:<family> with family in {TINY_FAMILIES}")
        model, tok = tiny_model(family), tiny_tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(spec)
        from ssah_plugin.io.model_path import (
            check_model_path,  # one clear line for a path that holds no model
        )

        check_model_path(spec)
        if path.is_dir() and (path / "adapter_config.json").is_file():
            model, tok = _load_adapter(path, dtype)
        else:
            if not path.exists() and spec.startswith((".", "/", "~")):
                raise DataError(f"model folder {spec!r} does not exist")
            kwargs: dict[str, Any] = {}
            if dtype is not None:
                kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            try:
                tok = AutoTokenizer.from_pretrained(spec)
                model = AutoModelForCausalLM.from_pretrained(spec, **kwargs)
            except OSError as exc:
                where = "" if path.exists() else f"there is no local folder {spec!r}, and as a hub name: "
                first = f"cannot load model {spec!r}: {where}{exc}".splitlines()[0]
                raise DataError(first + " (a local folder with config.json and weights, a hub name, or "
                                "tiny:<family>)") from None
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def _load_adapter(path: Path, dtype):
    """A PEFT adapter folder: merged into the base named in its ``adapter_config.json`` (what users deploy)."""
    from transformers import AutoTokenizer

    from ssah_plugin.io.adapters import merge_adapter_state

    try:
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise DataError(f"{path}/adapter_config.json does not name its base model ({exc}); merge the adapter "
                        "yourself (model.merge_and_unload().save_pretrained(dir)) and evaluate that folder") from None
    if not base:
        raise DataError(f"{path}/adapter_config.json does not name its base model; merge the adapter yourself "
                        "(model.merge_and_unload().save_pretrained(dir)) and evaluate that folder")
    model = merge_adapter_state(base, path, dtype=dtype or "auto")
    tok_dir = path if (path / "tokenizer_config.json").is_file() else base
    return model, AutoTokenizer.from_pretrained(tok_dir)
