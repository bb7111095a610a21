"""Framework-free enforcement: frozen slices stay bitwise identical, whatever the optimizer does.

Two mechanisms, both vectorised per parameter (one op per frozen tensor, never a loop over units):

1. **Gradient masking, as gradients are produced.** A hook zeroes the frozen slices of each gradient during
   ``backward()``, before gradient accumulation completes, before grad-norm clipping and before
   ``optimizer.step()``. Clipping therefore never counts frozen gradients.
2. **Restore after every optimizer step.** Zero gradients do not freeze a weight: AdamW's decoupled weight decay,
   momentum from earlier steps, or loss-scaler tricks still move it. :meth:`FreezeEngine.after_step` writes the
   snapshot back with ``index_copy_`` right after ``optimizer.step()`` and before ``zero_grad()``, so the frozen
   values are bitwise those of the snapshot at every step boundary.

Only the frozen slices are snapshotted: the extra memory is the frozen fraction of the affected tensors.

On CPU the masking and restore ops run with one intra-op thread: they move a few kilobytes each, and a parallel
region costs far more than the work as soon as another process competes for the cores (measured: ``index_copy_``
of a 576 x 115 slice took 12-30 ms with 2 threads on a loaded 2-core machine, 0.1 ms with 1; see
``benchmarks/results/overhead.md``). GPU tensors are not affected.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Literal

import torch

from .resolve import FrozenSlice

__all__ = ["FreezeEngine", "GradMode"]

logger = logging.getLogger(__name__)

GradMode = Literal["tensor", "post_accumulate", "none"]


@contextlib.contextmanager
def _small_op_threads(device: torch.device) -> Iterator[None]:
    """Run tiny indexing ops on CPU single-threaded (restores the thread count afterwards)."""
    n = torch.get_num_threads() if device.type == "cpu" else 1
    if n <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _on(index: torch.Tensor, device: torch.device, cache: dict) -> torch.Tensor:
    """``index`` on ``device`` (cached: a model moved after attach, e.g. by accelerate, keeps working)."""
    if index.device == device:
        return index
    key = str(device)
    if key not in cache:
        cache[key] = index.to(device)
    return cache[key]


class FreezeEngine:
    """Keep a list of :class:`~ssah_plugin.resolve.FrozenSlice` exact on plain PyTorch parameters.

    Args:
        slices: what to freeze (from :func:`ssah_plugin.resolve.plan_frozen_slices`).
        grad_mode: ``"tensor"`` masks with ``Tensor.register_hook`` (runs when the gradient is computed, before it
            is accumulated into ``.grad`` and before DDP / DeepSpeed reduction hooks see it: safe everywhere);
            ``"post_accumulate"`` zeroes ``.grad`` in place after accumulation (no extra copy; single process only);
            ``"none"`` leaves gradients alone (restore only).

    Lifecycle: :meth:`attach` once before the first backward (snapshot + hooks); :meth:`after_step` after every
    ``optimizer.step()``; :meth:`detach` at the end.
    """

    def __init__(self, slices: list[FrozenSlice], grad_mode: GradMode = "tensor"):
        if grad_mode not in ("tensor", "post_accumulate", "none"):
            raise ValueError(f"grad_mode must be 'tensor', 'post_accumulate' or 'none', got {grad_mode!r}")
        self.slices = [s for s in slices if s.param.requires_grad]
        self.grad_mode = grad_mode
        self._snapshots: list[torch.Tensor] = []
        self._handles: list = []
        self.attached = False

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> "FreezeEngine":
        """Snapshot the frozen slices and register gradient hooks (call before the first backward)."""
        if self.attached:
            return self
        with torch.no_grad():
            self._snapshots = [
                s.param.index_select(s.axis, s.index).clone() if s.fill is None
                else torch.full_like(s.param.index_select(s.axis, s.index), s.fill)
                for s in self.slices
            ]
        if self.grad_mode != "none":
            for s in self.slices:
                self._handles.append(self._register(s))
        self.attached = True
        # A slice with a fixed fill (LoRA rows at zero) must hold from the start.
        self.after_step()
        return self

    def _register(self, s: FrozenSlice):
        axis, index, cache = s.axis, s.index, {}
        if self.grad_mode == "tensor":
            # Runs inside backward() when this parameter's gradient is computed, before accumulation into .grad.
            def _mask(g: torch.Tensor) -> torch.Tensor:
                with _small_op_threads(g.device):
                    return g.index_fill(axis, _on(index, g.device, cache), 0)

            return s.param.register_hook(_mask)

        # Runs inside backward() right after the gradient was accumulated into .grad (in place, no copy).
        def _zero(p: torch.Tensor) -> None:
            if p.grad is not None:
                with _small_op_threads(p.grad.device):
                    p.grad.index_fill_(axis, _on(index, p.grad.device, cache), 0)

        return s.param.register_post_accumulate_grad_hook(_zero)

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the snapshot back into every frozen slice (call right after ``optimizer.step()``)."""
        if not self.slices:
            return
        with _small_op_threads(self.slices[0].param.device):
            for i, (s, snap) in enumerate(zip(self.slices, self._snapshots)):
                dev = s.param.device
                if snap.device != dev:  # the model was moved after attach (accelerate.prepare, .to())
                    snap = self._snapshots[i] = snap.to(dev)
                if s.index.device != dev:
                    s.index = s.index.to(dev)
                s.param.index_copy_(s.axis, s.index, snap)

    def detach(self) -> None:
        """Remove the gradient hooks (the snapshot is kept for :meth:`max_drift`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.attached = False  # a later attach() takes a new snapshot and registers the hooks again

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def max_drift(self) -> float:
        """Largest absolute difference between any frozen value and its snapshot (0.0 when exact)."""
        worst = 0.0
        for s, snap in zip(self.slices, self._snapshots):
            cur = s.param.index_select(s.axis, s.index)
            if not torch.equal(cur, snap):
                worst = max(worst, float((cur.double() - snap.double()).abs().max()))
        return worst

    @property
    def frozen_elements(self) -> int:
        return sum(s.numel for s in self.slices)

    @property
    def snapshot_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._snapshots)
