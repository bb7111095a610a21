"""The DeepSpeed enforcer: frozen units stay bit-exact under ZeRO stages 1, 2 and 3 (fp32 or bf16), no communication.

Built (after the set-up checks) by :func:`ssah_plugin.hosts.deepspeed.build_deepspeed_enforcer`; DeepSpeed itself is
imported only inside the ZeRO-3 planning function.

Where the values live under ZeRO, and what this module does with each copy:

* **Gradients.** ``param.register_hook`` sees the full, unpartitioned gradient as autograd produces it, before
  ZeRO's own post-accumulate hooks reduce and partition it. A hook zeroes the frozen slices there, so gradient
  accumulation, DeepSpeed's grad-norm clipping and the Adam moments never see frozen gradients.
* **fp32 master weights** (the tensors the optimizer really updates) are flat partitions: each rank owns a contiguous
  fragment of every parameter (ZeRO-1/2 and DeepSpeed's ``BF16_Optimizer``: ``param._hp_mapping``, for which
  DeepSpeed has no public local accessor; ZeRO-3: ``deepspeed.utils.safe_get_local_fp32_param``). At
  :meth:`DeepSpeedEnforcer.attach` every rank records, for its own fragments only, the frozen values and where they
  sit, as a few blocks (:mod:`ssah_plugin.hosts.zero_fragments`: arithmetic, no per-element positions).
* **The step.** DeepSpeed's ZeRO optimizer calls the wrapped torch optimizer's ``step()`` once per (sub-)group, then
  copies the fp32 partitions into the model's copy (fp32 or bf16) and all-gathers it. A step post-hook on that torch
  optimizer (``torch.optim.Optimizer.register_step_post_hook``: removal is its handle) runs right after each of these
  calls and writes the recorded values back into the fragments of the tensors that call has just updated
  (``index_copy_``, one per block), on each rank. The model's copy is then derived from the restored master by
  DeepSpeed itself, bitwise (``bf16(float32(x)) == x``), on every rank, before the next forward. No collective and no
  DeepSpeed call is added to the step. (The hook is torch's: DeepSpeed's optimizers are not torch optimizers, but they
  step the wrapped one through ``Optimizer.step``, which runs its post-hooks; ``tests/distributed`` checks that the
  restore ran inside every step.)
* **The model's copy** is checked by :meth:`DeepSpeedEnforcer.max_drift` on this rank's range only, against the same
  recorded values cast to its dtype: no rank keeps a replicated full-size snapshot. A fixed-fill slice (LoRA rows at
  zero) is written into every copy at attach.

Under ``accelerate`` the engine step runs inside ``accelerator.backward()`` at the accumulation boundary, so the
Trainer's ``on_optimizer_step`` comes too late; the post-hook makes the timing irrelevant, and
:meth:`DeepSpeedEnforcer.after_step` is a no-op kept for the common interface.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ssah_plugin.core.plan import FrozenSlice
from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.hosts.zero_fragments import FragmentPiece, plan_blocks

__all__ = ["DeepSpeedEnforcer"]

logger = logging.getLogger(__name__)

#: the enforcer attached to each torch optimizer (one per engine: a second would restore stale values)
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Master:
    """A master fragment: where it sits in its storage (to find it in the tensor a step has just updated)."""

    offset: int  # element offset of the fragment in its storage
    numel: int
    piece: FragmentPiece

    def local(self, stepped: torch.Tensor) -> torch.Tensor:
        """The fragment as a view of ``stepped`` (a tensor in the same storage), else re-read through the piece."""
        rel = self.offset - stepped.storage_offset()
        if stepped.is_contiguous() and 0 <= rel and rel + self.numel <= stepped.numel():
            return stepped.view(-1).narrow(0, rel, self.numel)
        return self.piece.get()


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _full_fill(p: torch.Tensor, shape: tuple[int, ...], s: FrozenSlice) -> None:
    """Write a fixed-fill slice into a full (replicated) copy, if this rank holds one."""
    if s.fill is not None and p.data.numel() == torch.Size(shape).numel() and p.data.numel():
        p.data.view(shape).index_fill_(s.axis, s.index.to(p.device), s.fill)


class DeepSpeedEnforcer:
    """Keep frozen slices bit-exact under a DeepSpeed engine; same interface as :class:`~ssah_plugin.FreezeEngine`.

    Lifecycle: :meth:`attach` once after ``deepspeed.initialize`` (and after ``load_checkpoint``), before the first
    backward; nothing per step (the restore is a post-hook of the optimizer step); :meth:`detach` at the end. Built
    by :func:`build_deepspeed_enforcer`, which checks the set-up first. ``stage`` is the ZeRO stage (0: DeepSpeed
    without ZeRO, fp32 only, where the parameters are the master weights).
    """

    def __init__(self, slices: list[FrozenSlice], model: nn.Module, zero_optimizer, torch_optimizer, stage: int):
        self.slices = [s for s in slices if s.param.requires_grad]
        self.model = model
        self.zero_optimizer = zero_optimizer
        self.optimizer = torch_optimizer
        self.stage = stage
        self._master: dict[int, list[_Master]] = {}  # storage key of a stepped tensor -> its fragments
        self._copies: list[FragmentPiece] = []  # this rank's range of the model's copies (checks, fills)
        self._handles: list = []
        self._step_hook = None
        self.attached = False
        self.restores = 0  # post-step hook calls (one per (sub-)group step)
        self.base_check = None  # set by build_deepspeed_enforcer

    # ------------------------------------------------------------------ planning (at attach)
    def _add_master(self, get, blocks, s: FrozenSlice) -> FragmentPiece | None:
        if not blocks:
            return None
        piece = FragmentPiece.record(get, blocks, s.fill)
        frag = get()
        self._master.setdefault(_storage_key(frag), []).append(_Master(frag.storage_offset(), frag.numel(), piece))
        return piece

    def _plan_zero0(self, s: FrozenSlice, p: nn.Parameter) -> None:
        if not p.data.is_contiguous():
            raise UnsupportedSetupError(f"{s.name} is not contiguous in memory, so ssah-plugin cannot restore it in "
                                        "place under DeepSpeed stage 0. Fix: use ZeRO stage 1, 2 or 3")
        self._add_master(lambda p=p: p.data.view(-1), plan_blocks(tuple(p.shape), s.axis, s.index, 0, p.numel()), s)

    def _plan_zero12(self, s: FrozenSlice, p: nn.Parameter) -> None:
        _full_fill(p, tuple(p.shape), s)  # every rank holds the full model copy
        mapping = p._hp_mapping
        if mapping is None:  # this rank owns no fragment of p
            return
        start, numel = int(mapping.lp_fragment_address.start), int(mapping.lp_fragment_address.numel)
        piece = self._add_master(lambda p=p: p._hp_mapping.get_hp_fragment(),
                                 plan_blocks(tuple(p.shape), s.axis, s.index, start, numel), s)
        if piece is not None:
            self._copies.append(piece.sharing(lambda p=p, a=start, n=numel: p.data.view(-1).narrow(0, a, n)))

    def _plan_zero3(self, s: FrozenSlice, p: nn.Parameter) -> None:
        from deepspeed import comm
        from deepspeed.utils import safe_get_local_fp32_param

        # rank r of the parameter's partition group owns [r * part, (r + 1) * part) of its flattening (padded)
        shape, numel, part = tuple(p.ds_shape), int(p.ds_numel), int(p.ds_tensor.numel())
        start = comm.get_rank(group=getattr(p, "ds_process_group", None)) * part
        first, again = safe_get_local_fp32_param(p), safe_get_local_fp32_param(p)
        if first is None or first.numel() != part or first.data_ptr() != again.data_ptr():
            raise UnsupportedSetupError(
                f"deepspeed.utils.safe_get_local_fp32_param({s.name}) does not return this rank's fp32 partition in "
                "place (optimizer offload or swapping?), so ssah-plugin cannot restore it. Fix: remove the offload_* "
                "blocks from the DeepSpeed config")
        if getattr(p, "ds_persist", False):  # a small parameter also keeps a full copy in p.data
            _full_fill(p, shape, s)
        piece = self._add_master(lambda p=p: safe_get_local_fp32_param(p),
                                 plan_blocks(shape, s.axis, s.index, start, part), s)
        if piece is None:
            return
        self._copies.append(piece.sharing(lambda p=p: p.ds_tensor.data.view(-1)))
        if getattr(p, "ds_persist", False):
            length = min(part, numel - start)
            self._copies.append(piece.sharing(
                lambda p=p, a=start, n=length: p.data.view(-1).narrow(0, a, n) if p.data.numel() == numel else None))

    def _plan(self) -> None:
        self._master.clear()
        self._copies.clear()
        plan = {0: self._plan_zero0, 1: self._plan_zero12, 2: self._plan_zero12, 3: self._plan_zero3}[self.stage]
        for s in self.slices:
            plan(s, s.param)

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> DeepSpeedEnforcer:
        """Record this rank's frozen values, register gradient hooks and the optimizer step post-hook."""
        if self.attached:
            return self
        other = _ATTACHED.get(self.optimizer)
        if other is not None and other is not self and other.attached:
            raise UnsupportedSetupError(
                f"ssah-plugin is already attached to this {type(self.optimizer).__name__} (two SSAHCallback or "
                "deepspeed_enforce calls on one engine?). Fix: attach one enforcer per engine, or detach() the first")
        with torch.no_grad():
            self._plan()
            for piece in self._copies:  # fixed-fill slices (LoRA rows/columns at zero) hold from the start
                if piece.fill is not None:
                    piece.restore()
            self._restore_all()
        for s in self.slices:
            axis, index = s.axis, s.index
            self._handles.append(s.param.register_hook(lambda g, a=axis, i=index: g.index_fill(a, i, 0)))
        self._step_hook = self.optimizer.register_step_post_hook(
            lambda opt, args, kwargs: self._restore_stepped(opt))
        _ATTACHED[self.optimizer] = self
        self.attached = True
        return self

    @torch.no_grad()
    def _restore_stepped(self, opt: torch.optim.Optimizer) -> None:
        """Restore the fragments of the tensors this (sub-)group step has just updated (the step post-hook)."""
        for group in opt.param_groups:
            for t in group["params"]:
                for m in self._master.get(_storage_key(t), ()):
                    m.piece.restore(m.local(t))
        self.restores += 1

    @torch.no_grad()
    def _restore_all(self) -> None:
        for masters in self._master.values():
            for m in masters:
                m.piece.restore()

    def after_step(self) -> None:
        """No-op: the restore already ran inside the optimizer step (kept for the common enforcer interface)."""

    def detach(self) -> None:
        """Remove the gradient hooks and the step post-hook (the recorded values are kept for :meth:`max_drift`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        if _ATTACHED.get(self.optimizer) is self:
            del _ATTACHED[self.optimizer]
        self.attached = False

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def max_drift(self) -> float:
        """Largest change of any frozen value in this rank's fp32 master fragments and its range of the model copy.

        Local only (no collective): call it on every rank and reduce yourself if you need a global answer.
        """
        worst = 0.0
        for masters in self._master.values():
            for m in masters:
                worst = max(worst, m.piece.drift())
        for piece in self._copies:
            worst = max(worst, piece.drift())
        return worst

    @property
    def frozen_elements(self) -> int:
        return sum(s.numel for s in self.slices)

    def _pieces(self) -> list[FragmentPiece]:
        return [m.piece for masters in self._master.values() for m in masters]

    @property
    def recorded_elements(self) -> int:
        """Frozen positions in this rank's own master fragments (under ZeRO the ranks' counts add up to
        :attr:`frozen_elements`: no rank records another rank's values)."""
        return sum(p.numel for p in self._pieces())

    @property
    def snapshot_bytes(self) -> int:
        """Memory held on this rank: the recorded values of its own fragments and their small block indices (the
        model-copy checks share both)."""
        return sum(p.nbytes for p in self._pieces())

    @property
    def index_bytes(self) -> int:
        """The part of :attr:`snapshot_bytes` that says where the values sit (int64 block indices)."""
        return sum(p.index_nbytes for p in self._pieces())

