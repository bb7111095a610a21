"""One check, shared by the commands and :func:`ssah_plugin.io.models.load_model`: is this a model we can load?

Run before any work, so that a folder that holds no model gives one clear line instead of a transformers
traceback (which, for a folder without a tokenizer, is about a missing tokenizer converter).
"""
from __future__ import annotations

import os
from pathlib import Path

from ssah_plugin.errors import DataError

__all__ = ["check_model_path", "check_output_file"]

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_path(spec: str | os.PathLike) -> None:
    """Raise :class:`~ssah_plugin.errors.DataError` when ``spec`` names a local path that holds no model.

    Accepted: ``tiny:<family>``, a folder with ``config.json`` (a saved model) or ``adapter_config.json`` (a PEFT
    adapter), and anything that is not a local path (a hub name, resolved later by transformers).
    """
    text = str(spec)
    if text.startswith("tiny:"):
        return
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return
        weights = [w for w in _WEIGHTS if (path / w).is_file()]
        what = f"weights ({', '.join(weights)}) but no config.json" if weights else \
            "no config.json and no adapter_config.json"
        raise DataError(f"{text!r} is a folder that holds no model: {what}. Pass the folder written by "
                        "save_pretrained() / trainer.save_model(), a hub name, or tiny:<family>")
    if path.exists():
        raise DataError(f"{text!r} is a file, not a model folder. Pass the folder written by save_pretrained(), a "
                        "hub name, or tiny:<family>")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise DataError(f"model folder {text!r} does not exist (a hub name is ORG/NAME)")


def check_output_file(path: str | os.PathLike, *, what: str = "output") -> Path:
    """Raise :class:`DataError` before any work when ``path`` cannot be written as a file (a directory, ...)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{what} {str(path)!r} is a directory; pass a file name, e.g. {str(p / 'mask.safetensors')!r}")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise DataError(f"{what} {str(path)!r}: no permission to write in {str(parent)!r}")
    return p
