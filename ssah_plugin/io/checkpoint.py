"""Read model weights one tensor at a time, without loading a model (for ``ssah-plugin verify``).

:class:`SafetensorsCheckpoint` opens a checkpoint written by ``save_pretrained`` (a folder with
``model.safetensors``, or sharded with ``model.safetensors.index.json``) or a single ``.safetensors`` file, one
:class:`~ssah_plugin.core.tensor_file.TensorFile` (the package's one safetensors reader) per shard. Tensors are
memory-mapped and read only when asked for, so verifying a 70B checkpoint needs the memory of its largest tensor,
not of the model.

:class:`ModuleTensors` offers the same interface over an in-memory model (used for PEFT adapters, which are merged
into their base first).

Both resolve a mask's parameter names (``model.layers.0.mlp.down_proj.weight``) tolerantly: the exact name first,
then with a ``model.``/``transformer.`` prefix removed or added, then with a ``base_model.model.`` prefix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch

from ssah_plugin.core.tensor_file import TensorFile
from ssah_plugin.errors import DataError
from ssah_plugin.io.adapters import is_adapter_dir, merge_adapter_state

__all__ = ["TensorSource", "SafetensorsCheckpoint", "ModuleTensors", "open_checkpoint"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_PREFIXES = ("", "model.", "transformer.", "base_model.model.")


class TensorSource(Protocol):
    """What :mod:`ssah_plugin.evaluation.verify` needs from a checkpoint."""

    description: str

    def keys(self) -> list[str]: ...

    def resolve(self, name: str) -> str | None: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype | str: ...

    def get(self, name: str) -> torch.Tensor: ...

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...

    def model_type(self) -> str | None: ...


def _resolve(name: str, keys: set[str]) -> str | None:
    if name in keys:
        return name
    bare = name
    for p in _PREFIXES[1:]:
        if name.startswith(p):
            bare = name[len(p):]
            break
    for p in _PREFIXES:
        if p + bare in keys:
            return p + bare
    return None


class SafetensorsCheckpoint:
    """Lazy, read-only access to a (possibly sharded) safetensors checkpoint.

    Args:
        path: a folder holding ``model.safetensors`` or ``model.safetensors.index.json`` + shards, or one
            ``.safetensors`` file.

    Raises:
        DataError: the path does not exist, holds no safetensors weights (e.g. only ``pytorch_model.bin``), the
            index names a missing shard, or a file is not readable safetensors.

    Example:
        >>> with SafetensorsCheckpoint("out/checkpoint-500") as ckpt:          # doctest: +SKIP
        ...     w = ckpt.get("model.layers.0.mlp.down_proj.weight")
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.description = str(self.path)
        self._config: dict | None = None
        if self.path.is_file():
            files = {None: self.path}
            self._weight_map = None
        elif self.path.is_dir():
            index = self.path / _INDEX
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DataError(f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc})") from None
                missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
                if missing:
                    raise DataError(f"{index} names shard file(s) that do not exist: {missing[:5]}; the checkpoint "
                                    "is incomplete (interrupted save or partial copy)")
                self._weight_map = dict(weight_map)
                files = {f: self.path / f for f in sorted(set(weight_map.values()))}
            elif (self.path / _SINGLE).is_file():
                files = {None: self.path / _SINGLE}
                self._weight_map = None
            else:
                other = [p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
                hint = (f" (found {other[:3]}: re-save with model.save_pretrained(dir, safe_serialization=True))"
                        if other else "")
                raise DataError(f"{self.path} holds no safetensors weights ({_SINGLE} or {_INDEX}){hint}")
        else:
            raise DataError(f"checkpoint {str(self.path)!r} does not exist")
        self._files: dict[object, TensorFile] = {fkey: TensorFile(p) for fkey, p in files.items()}
        self._keys: dict[str, object] = {}  # tensor name -> file key
        for fkey, tf in self._files.items():
            for k in tf.keys():
                self._keys[k] = fkey
        if self._weight_map is not None:
            absent = [k for k in self._weight_map if k not in self._keys]
            if absent:
                raise DataError(f"{self.path}: {len(absent)} tensor(s) listed in {_INDEX} are not in their shard "
                                f"(first: {absent[0]}); the checkpoint is damaged")

    # ------------------------------------------------------------------ interface
    def keys(self) -> list[str]:
        return list(self._keys)

    def resolve(self, name: str) -> str | None:
        """The stored name for a model parameter name, or None."""
        return _resolve(name, set(self._keys))

    def _file(self, name: str) -> tuple[TensorFile, str]:
        key = self._need(name)
        return self._files[self._keys[key]], key

    def shape(self, name: str) -> tuple[int, ...]:
        tf, key = self._file(name)
        return tf.shape(key)

    def dtype(self, name: str) -> torch.dtype | str:
        """The stored dtype as a torch dtype (the safetensors code, e.g. ``"F8_E4M3"``, if torch has no match)."""
        tf, key = self._file(name)
        return tf.dtype(key)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only this tensor's bytes are touched)."""
        tf, key = self._file(name)
        return tf.get(key)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` (first axis) of one tensor, touching only their bytes."""
        tf, key = self._file(name)
        return tf.get_rows(key, start, stop)

    def model_type(self) -> str | None:
        cfg = self.config()
        return cfg.get("model_type") if cfg else None

    def config(self) -> dict | None:
        """``config.json`` next to the weights, if any."""
        if self._config is None:
            folder = self.path if self.path.is_dir() else self.path.parent
            cfg = folder / "config.json"
            try:
                self._config = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
            except json.JSONDecodeError:
                self._config = {}
        return self._config or None

    def _need(self, name: str) -> str:
        key = self.resolve(name)
        if key is None:
            raise KeyError(name)
        return key

    def close(self) -> None:
        """Nothing stays open between reads; kept for symmetry with context-manager use."""

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ModuleTensors:
    """The :class:`TensorSource` interface over an in-memory model (e.g. a PEFT adapter merged into its base)."""

    def __init__(self, model: torch.nn.Module, description: str = "model") -> None:
        self.model = model
        self.description = description
        self._params = {k: v for k, v in model.state_dict(keep_vars=True).items()}

    def keys(self) -> list[str]:
        return list(self._params)

    def resolve(self, name: str) -> str | None:
        return _resolve(name, set(self._params))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._params[self._need(name)].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._params[self._need(name)].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._params[self._need(name)].detach()

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]

    def model_type(self) -> str | None:
        return getattr(getattr(self.model, "config", None), "model_type", None)

    def _need(self, name: str) -> str:
        key = self.resolve(name)
        if key is None:
            raise KeyError(name)
        return key

    def close(self) -> None:
        pass


def open_checkpoint(path: str | os.PathLike, *, base: str | os.PathLike | None = None):
    """A tensor source for ``path``: a safetensors checkpoint, or a PEFT adapter folder merged into ``base``.

    Adapter folders (``adapter_config.json``) are merged with PEFT's ``merge_and_unload`` by
    :func:`ssah_plugin.io.adapters.merge_adapter_state` (this loads the base model into memory once).
    """
    if is_adapter_dir(path):
        if base is None:
            raise DataError(f"{path} is a PEFT adapter folder; pass its base checkpoint too (--base)")
        merged = merge_adapter_state(base, path)
        return ModuleTensors(merged, description=f"{path} (adapter merged into {base})")
    return SafetensorsCheckpoint(path)
