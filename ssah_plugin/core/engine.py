"""Framework-free enforcement: frozen slices stay bitwise identical, whatever the optimizer does.

Two mechanisms, both vectorised per parameter (one op per frozen tensor, never a loop over units):

1. **Gradient masking, as gradients are produced.** A hook zeroes the frozen slices of each gradient during
   ``backward()``, before gradient accumulation completes, before grad-norm clipping and before
   ``optimizer.step()``. Clipping therefore never counts frozen gradients, and the optimizer's state (momentum, Adam
   moments) of frozen entries stays zero.
2. **Restore after every optimizer step.** Zero gradients do not freeze a weight: AdamW's decoupled weight decay,
   SGD's coupled weight decay and momentum, or loss-scaler tricks still move it. :meth:`FreezeEngine.after_step`
   writes the snapshot back right after ``optimizer.step()`` and before ``zero_grad()``, so the frozen values are
   bitwise those of the snapshot at every step boundary.

Only the frozen slices are snapshotted: the extra memory is the frozen fraction of the affected tensors. Where the
snapshot lives is a choice (``snapshot_device``, :mod:`ssah_plugin.core.snapshot`): next to each parameter (default;
fastest restore), or in host memory (``"cpu"``; pinned when the parameter is on CUDA, restored with non-blocking
host-to-device copies), for policies that freeze most of a model's weights on a GPU short of memory.

The per-step ops are :func:`write_slice` (``index_copy_``) and :func:`zero_slice` (``index_fill_``). On CPU they run
with one intra-op thread: a parallel region costs more than the work as soon as another process competes for the cores
(``benchmarks/results/overhead.md``). GPU tensors are not affected.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from ssah_plugin.core.frozen_slice import FrozenSlice
from ssah_plugin.core.snapshot import (
    SnapshotDevice,
    SnapshotStore,
    check_snapshot_device,
)

# SnapshotDevice and check_snapshot_device live in core.snapshot and are re-exported for the hosts
__all__ = ["FreezeEngine", "GradMode", "SnapshotDevice", "check_snapshot_device", "is_schedule_free",
           "unwrap_optimizer", "write_slice", "zero_slice"]

logger = logging.getLogger(__name__)

GradMode = Literal["tensor", "post_accumulate", "none"]
GRAD_MODES: tuple[str, ...] = ("tensor", "post_accumulate", "none")


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


def write_slice(target: torch.Tensor, axis: int, index: torch.Tensor, values: torch.Tensor) -> None:
    """Write ``values`` (``index_select(axis, index)``-shaped, ``target``'s device and dtype) into ``target``.

    The one restore primitive of the package: ``index_copy_``, one vectorised op per slice. Measured against
    ``index_put_`` on an axis-first view, ``masked_fill_`` / ``masked_scatter_`` with a broadcast mask, flat
    per-element indices and ``scatter_`` on the SmolLM2-135M slices, it was the fastest exact op on CPU
    (``benchmarks/results/overhead.md``).
    """
    target.index_copy_(axis, index, values)


def zero_slice(target: torch.Tensor, axis: int, index: torch.Tensor) -> None:
    """Zero ``target``'s ``index`` entries along ``axis`` in place (``index_fill_``: the gradient-masking primitive)."""
    target.index_fill_(axis, index, 0)


def unwrap_optimizer(optimizer: object) -> list:
    """The chain of optimizers from the outermost wrapper inwards (accelerate, DeepSpeed, ours).

    Follows the ``.optimizer`` attribute that every such wrapper exposes, stopping at a cycle or at ``None``.
    """
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


#: optimizer state entries that hold a copy of the parameter (schedule-free's z, its reference variants' x / y)
_PARAM_STATE_KEYS = ("z", "x", "y")


def is_schedule_free(optimizer: object) -> bool:
    """True for schedule-free optimizers: the ``train_mode`` flag their param groups (or they) carry.

    That flag is the protocol transformers and accelerate use to recognise them too (``schedulefree`` package and its
    reference variants; ``optim="schedule_free_*"`` in transformers).
    """
    groups = getattr(optimizer, "param_groups", None) or []
    return any(isinstance(g, dict) and "train_mode" in g for g in groups) or hasattr(optimizer, "train_mode")


class FreezeEngine:
    """Keep a list of :class:`~ssah_plugin.core.frozen_slice.FrozenSlice` exact on plain PyTorch parameters.

    Args:
        slices: what to freeze (from :func:`ssah_plugin.core.plan.plan_frozen_slices`).
        grad_mode: ``"tensor"`` masks with ``Tensor.register_hook`` (runs inside ``backward()`` when the gradient is
            computed, before it is accumulated into ``.grad`` and before DDP / DeepSpeed reduction hooks see it:
            safe everywhere; one temporary gradient-sized copy per frozen tensor); ``"post_accumulate"`` zeroes
            ``.grad`` in place right after each accumulation inside ``backward()`` (no copy; single process only);
            ``"none"`` leaves gradients alone (restore only: clipping then counts frozen gradients).
        cover_untrainable: also keep the frozen slices of parameters that do not require gradients now (they may be
            unfrozen later); PEFT's frozen base weights excepted.
        model: the model, needed only with ``cover_untrainable`` (a forward pre-hook gives a parameter unfrozen later
            its gradient hook before its first backward).
        snapshot_device: ``"param"`` (default) keeps the snapshot on each parameter's device; ``"cpu"`` keeps it in
            host memory (pinned when the parameter is on CUDA) and restores with non-blocking host-to-device copies
            enqueued on the current stream, before the next forward's kernels: the weights are exact whenever
            anything reads them, and the GPU holds none of the snapshot between steps.

    Lifecycle: :meth:`attach` once before the first backward (snapshot + hooks); :meth:`after_step` after every
    ``optimizer.step()`` and before ``zero_grad()``; :meth:`detach` at the end.
    """

    def __init__(self, slices: list[FrozenSlice], grad_mode: GradMode = "tensor", *, cover_untrainable: bool = False,
                 model: nn.Module | None = None, snapshot_device: SnapshotDevice = "param"):
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be 'tensor', 'post_accumulate' or 'none', got {grad_mode!r}")
        self._store = SnapshotStore(snapshot_device)
        self.snapshot_device = self._store.device
        self.slices = [s for s in slices
                       if s.param.requires_grad or (cover_untrainable and not s.meta.get("peft_base"))]
        self.grad_mode = grad_mode
        self.model = model
        self.base_check = None  # set by ssah_plugin.hosts.enforce.build_enforcer
        self._index_cache: list[dict] = [{} for _ in self.slices]
        self._handles: list = []
        self._hooked: set[int] = set()
        self._watch = None
        self._state_optimizers: list = []
        self.attached = False

    def bind_optimizer(self, optimizer: object) -> None:
        """Keep the frozen entries of ``optimizer``'s parameter-valued state exact too (schedule-free optimizers).

        Schedule-free optimizers (the ``schedulefree`` package; ``optim="schedule_free_*"`` in transformers) keep a
        second copy of every weight (``state["z"]``; reference variants ``"x"`` / ``"y"``) and rewrite the parameters
        from it when switched with ``optimizer.eval()`` / ``train()``. Restoring only the parameters would let weight
        decay move ``z`` and the switch move the frozen values; so :meth:`after_step` writes the snapshot into those
        state entries too, and with ``p == z == base`` on frozen slices every ``lerp`` between them is exact.
        """
        self._state_optimizers = [o for o in unwrap_optimizer(optimizer) if is_schedule_free(o)]

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> FreezeEngine:
        """Snapshot the frozen slices and register gradient hooks (call before the first backward)."""
        if self.attached:
            return self
        with torch.no_grad():
            self._store.clear()
            for s, cache in zip(self.slices, self._index_cache):
                values = s.param.index_select(s.axis, _on(s.index, s.param.device, cache))
                self._store.add(values if s.fill is None else torch.full_like(values, s.fill), s.param)
        self._ensure_hooks()
        if self.model is not None and any(not s.param.requires_grad for s in self.slices):
            # A parameter unfrozen later gets its gradient hook before its first backward (forward pre-hook).
            self._watch = self.model.register_forward_pre_hook(lambda module, args: self._ensure_hooks())
        self.attached = True
        # A slice with a fixed fill (LoRA rows at zero) must hold from the start.
        self.after_step()
        return self

    def _ensure_hooks(self) -> None:
        """Register gradient hooks on every frozen parameter that requires gradients and has none yet."""
        if self.grad_mode == "none":
            return
        for s, cache in zip(self.slices, self._index_cache):
            key = id(s)
            if key not in self._hooked and s.param.requires_grad:
                self._handles.append(self._register(s, cache))
                self._hooked.add(key)

    def _register(self, s: FrozenSlice, cache: dict):
        axis, index = s.axis, s.index
        if self.grad_mode == "tensor":
            # Runs inside backward() when this parameter's gradient is computed, before accumulation into .grad.
            def _mask(g: torch.Tensor) -> torch.Tensor:
                with _small_op_threads(g.device):
                    out = g.clone()  # a tensor hook must not modify its argument
                    zero_slice(out, axis, _on(index, g.device, cache))
                    return out

            return s.param.register_hook(_mask)

        # Runs inside backward() right after the gradient was accumulated into .grad (in place, no copy).
        def _zero(p: torch.Tensor) -> None:
            if p.grad is not None:
                with _small_op_threads(p.grad.device):
                    zero_slice(p.grad, axis, _on(index, p.grad.device, cache))

        return s.param.register_post_accumulate_grad_hook(_zero)

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the snapshot back into every frozen slice (call right after ``optimizer.step()``, before
        ``zero_grad()`` and the next forward)."""
        if not self.slices:
            return
        with _small_op_threads(self.slices[0].param.device):
            for i, s in enumerate(self.slices):
                self._write_into(i, s.param)
            for opt in self._state_optimizers:
                self._sync_state(opt)
        if self._watch is not None:
            self._ensure_hooks()

    def _sync_state(self, optimizer: object) -> None:
        """Write the frozen values into the parameter-valued state of a schedule-free optimizer (see bind_optimizer)."""
        state = getattr(optimizer, "state", None)
        if not state:
            return
        for i, s in enumerate(self.slices):
            st = state.get(s.param)
            for key in _PARAM_STATE_KEYS if st else ():
                t = st.get(key)
                if isinstance(t, torch.Tensor) and t.shape == s.param.shape:
                    self._write_into(i, t)

    def _write_into(self, i: int, target: torch.Tensor) -> None:
        s = self.slices[i]
        write_slice(target, s.axis, _on(s.index, target.device, self._index_cache[i]),
                    self._store.values(i, s.param, target.device, target.dtype))

    def write_frozen_into(self, param: torch.Tensor, target: torch.Tensor) -> bool:
        """Write the frozen values of ``param`` into ``target``, a tensor of its shape (an EMA copy, a state entry).

        Returns whether ``param`` has frozen slices here (``target`` of another shape is left alone). Call it right
        after whatever updated ``target``.
        """
        found = False
        with torch.no_grad():
            for i, s in enumerate(self.slices):
                if s.param is param and target.shape == param.shape:
                    self._write_into(i, target)
                    found = True
        return found

    def detach(self) -> None:
        """Remove the gradient hooks (the snapshot is kept for :meth:`max_drift`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()
        if self._watch is not None:
            self._watch.remove()
            self._watch = None
        self.attached = False  # a later attach() takes a new snapshot and registers the hooks again

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def max_drift(self) -> float:
        """Largest absolute difference between any frozen value and its snapshot (0.0 when exact)."""
        worst = 0.0
        for s, snap, cache in zip(self.slices, self._store.tensors, self._index_cache):
            cur = s.param.index_select(s.axis, _on(s.index, s.param.device, cache))
            snap = snap.to(device=cur.device, dtype=cur.dtype)
            if not torch.equal(cur, snap):
                worst = max(worst, float((cur.double() - snap.double()).abs().max()))
        return worst

    @property
    def frozen_elements(self) -> int:
        return sum(s.numel for s in self.slices)

    @property
    def snapshot_bytes(self) -> int:
        """Bytes the snapshot holds (on the parameters' devices, or in host memory with ``snapshot_device="cpu"``)."""
        return self._store.nbytes

    @property
    def _snapshots(self) -> list[torch.Tensor]:
        """The snapshot tensors, one per slice (:class:`~ssah_plugin.core.snapshot.SnapshotStore`), for checks."""
        return self._store.tensors
