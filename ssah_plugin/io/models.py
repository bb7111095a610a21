"""Model loading and the small model facts every layer asks for (device, pad id, context length).

One implementation of each: locate, evaluation, recipes and the CLI all use these. Under ``torchrun`` (the
``LOCAL_RANK`` environment variable set) on a machine with CUDA, the default device is that rank's GPU
(:func:`local_rank_device`), both for :func:`resolve_device` ``("auto")`` and for :func:`load_model` without a
``device`` / ``device_map``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssah_plugin.core.units import unwrap_model
from ssah_plugin.errors import DataError, UnsupportedSetupError
from ssah_plugin.io.adapters import merge_adapter_state
from ssah_plugin.io.model_path import check_model_path
from ssah_plugin.io.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer

__all__ = ["load_model", "model_device", "pad_id_of", "max_positions", "resolve_device", "local_rank_device"]

#: what ``device_map`` accepts (passed to ``from_pretrained``): "auto", "cpu", "cuda:1", a device index, a device,
#: or a ``{module name: device}`` dict
DeviceMap = str | int | torch.device | dict[str, Any]


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


def local_rank_device() -> torch.device | None:
    """The CUDA device of this process's local rank under ``torchrun`` (``LOCAL_RANK`` set and CUDA available);
    ``None`` otherwise. A ``LOCAL_RANK`` that is not an integer, or names a GPU this machine lacks, raises
    :class:`UnsupportedSetupError`."""
    raw = os.environ.get("LOCAL_RANK")
    if raw is None or not torch.cuda.is_available():
        return None
    try:
        rank = int(raw)
    except ValueError:
        raise UnsupportedSetupError(f"LOCAL_RANK={raw!r} is not an integer; launch with torchrun, or unset "
                                    "LOCAL_RANK") from None
    count = torch.cuda.device_count()
    if not 0 <= rank < count:
        raise UnsupportedSetupError(f"LOCAL_RANK={rank} but this machine has {count} CUDA device(s); launch at most "
                                    f"{count} processes per node (torchrun --nproc-per-node {count})")
    return torch.device("cuda", rank)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or ``None``): this rank's GPU under ``torchrun``, else the first CUDA device if there is one,
    else the CPU. Anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        rank_device = local_rank_device()
        if rank_device is not None:
            return rank_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str | None = None,
               device_map: DeviceMap | None = None):
    """Load ``(model, tokenizer)`` from ``tiny:<family>`` (tests), a local folder, or a hub name; in eval mode.

    Args:
        dtype: load dtype (``"bfloat16"``, ``torch.float16``, ...); default: the checkpoint's own (``from_pretrained``
            default).
        device: move the loaded model there (``"cpu"``, ``"cuda:1"``, ``"auto"``).
        device_map: passed to ``from_pretrained`` (``"auto"`` spreads a large model over the GPUs, ``"cuda:0"``
            loads straight onto one; needs ``accelerate``). A tiny model or a merged adapter, which do not come from
            ``from_pretrained``, is moved to a single-device ``device_map`` instead; ``"auto"`` or a dict is refused
            for them. Give ``device`` or ``device_map``, not both.

    Without ``device`` and ``device_map`` the model stays where ``from_pretrained`` puts it (the CPU), except under
    ``torchrun`` with CUDA, where it is loaded onto this rank's GPU (:func:`local_rank_device`).

    A folder holding a PEFT adapter (``adapter_config.json``) is merged into the base model its config names
    (:func:`ssah_plugin.io.adapters.merge_adapter_state`); its tokenizer is the adapter folder's if saved, else the
    base's.
    """
    if device is not None and device_map is not None:
        raise DataError(f"load_model got device={device!r} and device_map={device_map!r}; give one of them")
    if device is None and device_map is None:
        device_map = local_rank_device()
    elif device == "auto":
        device = str(resolve_device("auto"))
    spec = str(spec)
    single = _single_device(device_map)
    if spec.startswith("tiny:"):
        family = spec.partition(":")[2] or "llama"
        if family not in TINY_FAMILIES:
            raise DataError(f"unknown tiny model {spec!r}; choose tiny:<family> with family in {TINY_FAMILIES}")
        model, tok = tiny_model(family), tiny_tokenizer()
        device = device if device_map is None else _need_single(single, device_map, spec)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(spec)
        check_model_path(spec)  # one clear line for a path that holds no model
        if path.is_dir() and (path / "adapter_config.json").is_file():
            model, tok = _load_adapter(path, dtype)
            device = device if device_map is None else _need_single(single, device_map, spec)
        else:
            if not path.exists() and spec.startswith((".", "/", "~")):
                raise DataError(f"model folder {spec!r} does not exist")
            kwargs: dict[str, Any] = {}
            if dtype is not None:
                kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            if device_map is not None:
                kwargs["device_map"] = device_map
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


def _single_device(device_map: DeviceMap | None) -> torch.device | None:
    """The one device a ``device_map`` names (``"cuda:1"``, ``1``, a device), or ``None`` ("auto", a dict)."""
    if device_map is None or isinstance(device_map, dict) or (
            isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential")):
        return None
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise DataError(f"device_map={device_map!r} is not a device, a device index, 'auto' or a dict") from None


def _need_single(single: torch.device | None, device_map: DeviceMap, spec: str) -> torch.device:
    if single is None:
        raise DataError(f"device_map={device_map!r} needs from_pretrained; {spec!r} is built in memory (a tiny model "
                        "or a merged adapter): pass device= or a single-device device_map such as 'cuda:0'")
    return single


def _load_adapter(path: Path, dtype):
    """A PEFT adapter folder: merged into the base named in its ``adapter_config.json`` (what users deploy)."""
    from transformers import AutoTokenizer

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
