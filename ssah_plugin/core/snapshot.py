"""Where the freeze engine keeps the frozen values, and how it reads them back for a restore.

Split from :mod:`ssah_plugin.core.engine` because it is a decision of its own (memory against restore speed), with
its own rules, apart from the hooks and the per-step ops: a :class:`SnapshotStore` holds one tensor per frozen
slice, either next to its parameter (``"param"``: on its GPU, the fastest restore) or in host memory (``"cpu"``:
pinned when the parameter is on CUDA, restored with non-blocking host-to-device copies; frees GPU memory for
policies that freeze most weights). It follows a model that is cast or moved after the snapshot was taken.

The store is filled once at :meth:`~ssah_plugin.core.engine.FreezeEngine.attach` (before the first backward) and read
right after every ``optimizer.step()``, before ``zero_grad()`` and the next forward.
"""
from __future__ import annotations

from typing import Literal

import torch

__all__ = ["SNAPSHOT_DEVICES", "SnapshotDevice", "SnapshotStore", "check_snapshot_device"]

SnapshotDevice = Literal["param", "cpu"]
SNAPSHOT_DEVICES: tuple[str, ...] = ("param", "cpu")


def check_snapshot_device(value: object) -> str:
    """``value`` if it is a valid ``snapshot_device``, else a :class:`ValueError` that names the choices."""
    if value not in SNAPSHOT_DEVICES:
        raise ValueError(
            f"snapshot_device must be 'param' (keep the snapshot of the frozen values next to each parameter, e.g. "
            f"on its GPU: fastest restore) or 'cpu' (keep it in host memory, pinned when the parameters are on CUDA, "
            f"and restore with non-blocking copies: frees GPU memory), got {value!r}")
    return str(value)


class SnapshotStore:
    """The snapshot of each frozen slice, in order, on the chosen device (``"param"`` or ``"cpu"``)."""

    def __init__(self, device: SnapshotDevice = "param"):
        self.device = check_snapshot_device(device)
        #: one tensor per slice, ``index_select(axis, index)``-shaped
        self.tensors: list[torch.Tensor] = []

    def clear(self) -> None:
        self.tensors = []

    def add(self, values: torch.Tensor, param: torch.Tensor) -> None:
        """Keep ``values`` (a fresh tensor: ``index_select`` / ``full_like`` output) as the next slice's snapshot."""
        self.tensors.append(self._placed(values, param))

    def _placed(self, values: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        if self.device == "param":
            return values
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=param.device.type == "cuda")
        host.copy_(values)  # blocking: the snapshot is complete before anything can change the parameter
        return host

    def current(self, i: int, param: torch.Tensor) -> torch.Tensor:
        """Slice ``i``'s snapshot in ``param``'s dtype, following a cast or a move of the model after attach."""
        snap = self.tensors[i]
        if snap.dtype != param.dtype:
            # The model was cast after attach (model.to(torch.bfloat16)). A cast rounds the base values exactly as
            # the snapshot's cast does, so following it keeps the frozen values those of the base in the new dtype.
            snap = self.tensors[i] = self._placed(snap.to(dtype=param.dtype), param)
        if self.device == "param" and snap.device != param.device:
            snap = self.tensors[i] = snap.to(param.device)  # moved after attach (accelerate.prepare, .to())
        elif self.device == "cpu" and param.device.type == "cuda" and not snap.is_pinned():
            snap = self.tensors[i] = snap.pin_memory()  # moved to CUDA after attach
        return snap

    def values(self, i: int, param: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Slice ``i``'s snapshot on ``device`` in ``dtype`` (``param``: the slice's parameter).

        From pinned host memory the copy is non-blocking: it is enqueued on the current CUDA stream, after the
        optimizer's kernels and before those of the next forward, so every reader on that stream sees the restored
        values, and a host-side read (``.cpu()``, ``.item()``, saving a checkpoint) synchronises first.
        """
        snap = self.current(i, param)
        if snap.device == device and snap.dtype == dtype:
            return snap
        pinned = snap.device.type == "cpu" and device.type == "cuda" and snap.is_pinned()
        return snap.to(device=device, dtype=dtype, non_blocking=pinned)

    @property
    def nbytes(self) -> int:
        """Bytes held (on the parameters' devices, or in host memory with ``"cpu"``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)
