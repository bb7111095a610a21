"""The one safetensors reader: lazy, read-only access to one ``.safetensors`` file.

Used for mask files (:mod:`ssah_plugin.core.mask_format`) and for model checkpoints
(:class:`ssah_plugin.io.checkpoint.SafetensorsCheckpoint`, one :class:`TensorFile` per shard). Tensors are
memory-mapped by ``safetensors.safe_open`` and read only when asked for, so reading one tensor of a 70B checkpoint
needs the memory of that tensor, not of the file.

Handles are not cached: the file is memory-mapped, and pages read through a handle stay resident (and count in the
process's RSS) until it is closed, so every read opens and closes its own (the header parse costs well under a
millisecond).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ssah_plugin.errors import DataError

__all__ = ["ST_DTYPES", "TensorFile", "TensorFileError", "torch_dtype"]

#: safetensors dtype code -> torch dtype (codes torch cannot read, e.g. ``"F8_E4M3"`` on old torch, are absent).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def torch_dtype(code: str) -> torch.dtype | str:
    """The torch dtype of a safetensors dtype code, or the code itself when torch has no match."""
    return ST_DTYPES.get(code, code)


class TensorFileError(DataError):
    """A file that safetensors cannot open or read (not safetensors, truncated, corrupt header).

    ``reason`` is the underlying error as ``"<type>: <message>"``; callers that own a file type (mask files) turn
    it into their own error.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path} is not a readable safetensors file ({reason})")


class TensorFile:
    """Lazy, read-only access to one safetensors file.

    Args:
        path: the ``.safetensors`` file.

    Raises:
        TensorFileError: when the file cannot be opened or read (also raised by every read).

    The header (names, shapes, dtype codes, metadata) is read once, when the object is made; tensors are read
    when asked for.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._metadata, self._shapes = self._read(_header)

    def _read(self, fn: Callable):
        """``fn(handle)`` on a fresh ``safe_open`` handle; any failure to open or read is a :class:`TensorFileError`."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return fn(f)
        except Exception as exc:  # safetensors raises several types for bad headers / truncation / other files
            raise TensorFileError(self.path, f"{type(exc).__name__}: {str(exc)[:200]}") from None

    def metadata(self) -> dict[str, str]:
        """The file's string metadata (``{}`` when it has none)."""
        return dict(self._metadata)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name][0]

    def dtype_code(self, name: str) -> str:
        """The stored safetensors dtype code (``"F32"``, ``"BF16"``, ...)."""
        return self._shapes[name][1]

    def dtype(self, name: str) -> torch.dtype | str:
        """The stored dtype as a torch dtype (the safetensors code if torch has no match)."""
        return torch_dtype(self._shapes[name][1])

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (only this tensor's bytes are touched); ``KeyError`` for a name the file lacks."""
        self._need(name)
        return self._read(lambda f: f.get_tensor(name))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` (first axis) of one tensor, touching only their bytes."""
        self._need(name)
        return self._read(lambda f: f.get_slice(name)[start:stop])

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor of the file (for small files such as masks), through one handle."""
        return self._read(lambda f: {k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (a handle, not a dict)

    def _need(self, name: str) -> None:
        if name not in self._shapes:
            raise KeyError(name)


def _header(f) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    """Metadata and ``name -> (shape, dtype code)`` of an open handle (no tensor data is read)."""
    shapes = {}
    for k in f.keys():  # noqa: SIM118 (a handle, not a dict)
        sl = f.get_slice(k)
        shapes[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return dict(f.metadata() or {}), shapes
