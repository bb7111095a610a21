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
from torch import nn

from ssah_plugin.core.plan import FrozenSlice

__all__ = ["FreezeEngine", "GradMode", "is_schedule_free", "unwrap_optimizer"]

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


def is_schedule_free(optimizer) -> bool:
    """True for schedule-free optimizers (``schedulefree`` package, or any with ``train_mode`` in its groups)."""
    if type(optimizer).__module__.split(".")[0] == "schedulefree":
        return True
    groups = getattr(optimizer, "param_groups", None) or []
    return any(isinstance(g, dict) and "train_mode" in g for g in groups) or hasattr(optimizer, "train_mode")


@torch.no_grad()
def _sync_state(optimizer, slices: list[FrozenSlice], snapshots: list[torch.Tensor]) -> None:
    """Write the frozen values into the parameter-valued state of a schedule-free optimizer (see bind_optimizer)."""
    state = getattr(optimizer, "state", None)
    if not state:
        return
    for s, snap in zip(slices, snapshots):
        st = state.get(s.param)
        if not st:
            continue
        for key in _PARAM_STATE_KEYS:
            t = st.get(key)
            if isinstance(t, torch.Tensor) and t.shape == s.param.shape:
                t.index_copy_(s.axis, s.index.to(t.device), snap.to(device=t.device, dtype=t.dtype))


class FreezeEngine:
    """Keep a list of :class:`~ssah_plugin.core.plan.FrozenSlice` exact on plain PyTorch parameters.

    Args:
        slices: what to freeze (from :func:`ssah_plugin.core.plan.plan_frozen_slices`).
        grad_mode: ``"tensor"`` masks with ``Tensor.register_hook`` (runs when the gradient is computed, before it
            is accumulated into ``.grad`` and before DDP / DeepSpeed reduction hooks see it: safe everywhere);
            ``"post_accumulate"`` zeroes ``.grad`` in place after accumulation (no extra copy; single process only);
            ``"none"`` leaves gradients alone (restore only).

    Lifecycle: :meth:`attach` once before the first backward (snapshot + hooks); :meth:`after_step` after every
    ``optimizer.step()``; :meth:`detach` at the end.
    """

    def __init__(self, slices: list[FrozenSlice], grad_mode: GradMode = "tensor", *, cover_untrainable: bool = False,
                 model: nn.Module | None = None):
        if grad_mode not in ("tensor", "post_accumulate", "none"):
            raise ValueError(f"grad_mode must be 'tensor', 'post_accumulate' or 'none', got {grad_mode!r}")
        self.slices = [s for s in slices
                       if s.param.requires_grad or (cover_untrainable and not s.meta.get("peft_base"))]
        self.grad_mode = grad_mode
        self.model = model
        self.base_check = None  # set by ssah_plugin.hosts.enforce.build_enforcer
        self._snapshots: list[torch.Tensor] = []
        self._handles: list = []
        self._hooked: set[int] = set()
        self._watch = None
        self._state_optimizers: list = []
        self.attached = False

    def bind_optimizer(self, optimizer) -> None:
        """Keep the frozen entries of ``optimizer``'s parameter-valued state exact too (schedule-free optimizers).

        Schedule-free optimizers (the ``schedulefree`` package; ``optim="schedule_free_*"`` in transformers) keep a
        second copy of every weight (``state["z"]``; reference variants ``"x"`` / ``"y"``) and rewrite the parameters
        from it when switched with ``optimizer.eval()`` / ``train()``. Restoring only the parameters would let weight
        decay move ``z`` and the switch move the frozen values; so :meth:`after_step` writes the snapshot into those
        state entries too, and with ``p == z == base`` on frozen slices every ``lerp`` between them is exact.
        """
        self._state_optimizers = [o for o in unwrap_optimizer(optimizer) if is_schedule_free(o)]

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
        for s in self.slices:
            key = id(s)
            if key not in self._hooked and s.param.requires_grad:
                self._handles.append(self._register(s))
                self._hooked.add(key)

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
                if snap.device != dev or snap.dtype != s.param.dtype:
                    # The model was moved (accelerate.prepare, .to()) or cast (model.to(torch.bfloat16)) after
                    # attach. A cast rounds the base values exactly as the snapshot's cast does, so following it
                    # keeps the frozen values those of the base in the new dtype.
                    snap = self._snapshots[i] = snap.to(device=dev, dtype=s.param.dtype)
                if s.index.device != dev:
                    s.index = s.index.to(dev)
                s.param.index_copy_(s.axis, s.index, snap)
            for opt in self._state_optimizers:
                _sync_state(opt, self.slices, self._snapshots)
        if self._watch is not None:
            self._ensure_hooks()

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
        for s, snap in zip(self.slices, self._snapshots):
            cur = s.param.index_select(s.axis, s.index.to(s.param.device))
            snap = snap.to(device=cur.device, dtype=cur.dtype)
            if not torch.equal(cur, snap):
                worst = max(worst, float((cur.double() - snap.double()).abs().max()))
        return worst

    @property
    def frozen_elements(self) -> int:
        return sum(s.numel for s in self.slices)

    @property
    def snapshot_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._snapshots)
