"""DeepSpeed host: frozen units stay bit-exact under ZeRO stages 1, 2 and 3 (fp32 or bf16), with no communication.

Imported only when a DeepSpeed engine is detected (:func:`ssah_plugin.hosts.enforce.build_enforcer`) or when a raw
DeepSpeed user calls :func:`deepspeed_enforce`.

Where the values live under ZeRO, and what this module does with each copy:

* **Gradients.** ``param.register_hook`` sees the full, unpartitioned gradient as autograd produces it, before
  ZeRO's own post-accumulate hooks reduce and partition it. A hook zeroes the frozen slices there, so gradient
  accumulation, DeepSpeed's grad-norm clipping and the Adam moments never see frozen gradients.
* **fp32 master weights** (the tensors the optimizer really updates) are flat partitions: each rank owns a contiguous
  fragment of every parameter (ZeRO-1/2 and DeepSpeed's BF16 optimizer: ``param._hp_mapping``; ZeRO-3: a slice of
  ``fp32_partitioned_groups_flat``). At :meth:`DeepSpeedEnforcer.attach` every rank records, for its own fragments
  only, the flat positions of the frozen values and their current values.
* **The step.** DeepSpeed's ZeRO optimizer calls the wrapped torch optimizer's ``step()`` once per (sub-)group, then
  copies the fp32 partitions into the model's copy (fp32 or bf16) and all-gathers it. We wrap that inner
  ``step()`` on this one instance (no global patching): right after it returns, each rank writes its recorded values
  back into its own master fragments (``index_copy_``, one op per fragment). The model's copy is then derived from
  the restored master by DeepSpeed itself, bitwise (``bf16(float32(x)) == x``), on every rank, before the next
  forward. No collective is added to the step.

Under ``accelerate`` the engine step runs inside ``accelerator.backward()`` at the accumulation boundary, so the
Trainer's ``on_optimizer_step`` comes too late; wrapping the inner ``step()`` makes the timing irrelevant, and
:meth:`DeepSpeedEnforcer.after_step` is a no-op kept for the common interface.

Refused at setup (:class:`~ssah_plugin.errors.UnsupportedSetupError`): ZeRO-Offload / ZeRO-Infinity (optimizer or
parameter offload, NVMe swap), fp16 with loss scaling, ZeRO++ secondary partitions (hpZ), DeepSpeed without ZeRO in
reduced precision, and any DeepSpeed optimizer this module cannot map to fragments.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ssah_plugin.core.engine import is_schedule_free, unwrap_optimizer
from ssah_plugin.core.plan import FrozenSlice, plan_frozen_slices
from ssah_plugin.errors import UnsupportedSetupError, require
from ssah_plugin.hosts.setup import load_mask, run_base_check

__all__ = ["DeepSpeedEnforcer", "build_deepspeed_enforcer", "deepspeed_enforce", "refuse_under_zero"]

logger = logging.getLogger(__name__)

_ZERO12 = ("DeepSpeedZeroOptimizer", "BF16_Optimizer")
_ZERO3 = ("DeepSpeedZeroOptimizer_Stage3",)


@dataclass
class _Piece:
    """One frozen slice's share on this rank: flat positions in a local 1-D tensor and their frozen values."""

    get: Callable[[], torch.Tensor]  # returns the 1-D local tensor (re-fetched: checkpoint loading may relink)
    pos: torch.Tensor  # int64 positions in get()
    snap: torch.Tensor  # values to keep (same dtype as get())

    @torch.no_grad()
    def restore(self) -> None:
        self.get().index_copy_(0, self.pos, self.snap)

    @torch.no_grad()
    def drift(self) -> float:
        cur = self.get().index_select(0, self.pos)
        if torch.equal(cur, self.snap):
            return 0.0
        return float((cur.double() - self.snap.double()).abs().max())


@dataclass
class _FullPiece:
    """A frozen slice of a full (replicated) tensor: ``index`` along ``axis`` of ``get()``."""

    get: Callable[[], torch.Tensor]
    axis: int
    index: torch.Tensor
    snap: torch.Tensor

    @torch.no_grad()
    def restore(self) -> None:
        t = self.get()
        if t.numel():
            t.index_copy_(self.axis, self.index, self.snap)

    @torch.no_grad()
    def drift(self) -> float:
        t = self.get()
        if not t.numel():
            return 0.0
        cur = t.index_select(self.axis, self.index)
        if torch.equal(cur, self.snap):
            return 0.0
        return float((cur.double() - self.snap.double()).abs().max())


def _flat_positions(s: FrozenSlice, shape: tuple[int, ...]) -> torch.Tensor:
    """Positions of the frozen values of ``s`` in the row-major flattening of a tensor of ``shape``."""
    sel = torch.zeros(shape, dtype=torch.bool)
    sel.index_fill_(s.axis, s.index.cpu(), True)
    return sel.reshape(-1).nonzero().reshape(-1)


def _local(flat: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    keep = (flat >= start) & (flat < start + numel)
    return (flat[keep] - start).contiguous()


def _full_or_empty(p: nn.Parameter, shape: tuple[int, ...]) -> torch.Tensor:
    """A ZeRO-3 persistent parameter's full copy (or an empty slice-compatible tensor if it is released)."""
    if p.data.numel() == p.ds_numel:
        return p.data.view(shape)
    return torch.empty((0,) * len(shape), dtype=p.dtype, device=p.device)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _find_zero_optimizer(optimizer) -> tuple[object | None, object]:
    """(DeepSpeed ZeRO/BF16 optimizer or None, the torch optimizer that really steps) from any wrapper chain."""
    chain = unwrap_optimizer(optimizer)
    if not chain:
        raise UnsupportedSetupError(
            "ssah-plugin found a DeepSpeed model but no optimizer: pass the engine to ssah_plugin.deepspeed_enforce "
            "after deepspeed.initialize(..., optimizer=...), or use SSAHCallback with a Trainer")
    for i, opt in enumerate(chain):
        if type(opt).__name__ in _ZERO12 + _ZERO3:
            if i + 1 >= len(chain) or not isinstance(chain[i + 1], torch.optim.Optimizer):
                raise UnsupportedSetupError(
                    f"DeepSpeed optimizer {type(opt).__name__} wraps no torch optimizer ssah-plugin can hook. Use a "
                    "torch optimizer (or the DeepSpeed config 'optimizer' block with \"torch_adam\": true)")
            return opt, chain[i + 1]
    inner = chain[-1]
    if any(type(o).__module__.startswith("deepspeed") for o in chain) or not isinstance(inner, torch.optim.Optimizer):
        raise UnsupportedSetupError(
            f"DeepSpeed optimizer {type(chain[-1]).__name__} has no fragment mapping ssah-plugin can use. Supported: "
            "ZeRO stages 1, 2, 3 (DeepSpeedZeroOptimizer, BF16_Optimizer, DeepSpeedZeroOptimizer_Stage3) and "
            "stage 0 in fp32. Fix: set zero_optimization.stage to 1, 2 or 3")
    return None, inner


def _check_setup(zero_opt, model: nn.Module) -> None:
    """Refuse, before any step, what the restore cannot keep exact; every message names cause and fix."""
    problems: list[str] = []
    params = [p for p in model.parameters() if p.requires_grad]
    if zero_opt is None:
        if any(p.dtype != torch.float32 for p in params):
            problems.append("DeepSpeed without ZeRO (stage 0) in reduced precision keeps no fp32 master ssah-plugin "
                            "can map. Fix: use ZeRO stage 1, 2 or 3 (integrations/deepspeed/zero2.json)")
    else:
        if getattr(zero_opt, "cpu_offload", False) or getattr(zero_opt, "offload_optimizer", False) or \
                getattr(zero_opt, "offload_param", False) or getattr(zero_opt, "swap_optimizer", False):
            problems.append("ZeRO-Offload / ZeRO-Infinity (offload_optimizer / offload_param / NVMe) is not supported: "
                            "the master weights and the step live in DeepSpeed's CPU optimizer, outside the hooked "
                            "torch optimizer. Fix: remove the offload_* blocks from the DeepSpeed config")
        if any(p.dtype == torch.float16 for p in params) or getattr(zero_opt, "dtype", None) == torch.float16:
            problems.append("fp16 with dynamic loss scaling under DeepSpeed is not tested by ssah-plugin. Fix: use "
                            "bf16 (\"bf16\": {\"enabled\": true}) or fp32")
        if any(getattr(p, "ds_secondary_tensor", None) is not None for p in params):
            problems.append("ZeRO++ hierarchical partitioning (zero_hpz_partition_size > 1) keeps a secondary copy "
                            "ssah-plugin does not restore. Fix: set zero_hpz_partition_size to 1")
        if type(zero_opt).__name__ in _ZERO12 and any(not hasattr(p, "_hp_mapping") for p in params):
            problems.append(f"{type(zero_opt).__name__} exposes no tensor-fragment mapping (param._hp_mapping) for "
                            "some parameters. Fix: upgrade deepspeed (>= 0.10)")
    if problems:
        raise UnsupportedSetupError("ssah-plugin cannot keep frozen units exact in this DeepSpeed setup:\n  - "
                                    + "\n  - ".join(problems))


class DeepSpeedEnforcer:
    """Keep frozen slices bit-exact under a DeepSpeed engine; same interface as :class:`~ssah_plugin.FreezeEngine`.

    Lifecycle: :meth:`attach` once after ``deepspeed.initialize`` (and after ``load_checkpoint``), before the first
    backward; nothing per step (the restore runs inside the optimizer step); :meth:`detach` at the end.
    """

    def __init__(self, slices: list[FrozenSlice], model: nn.Module, zero_optimizer, torch_optimizer):
        self.slices = [s for s in slices if s.param.requires_grad]
        self.model = model
        self.zero_optimizer = zero_optimizer
        self.optimizer = torch_optimizer
        self.stage = (3 if type(zero_optimizer).__name__ in _ZERO3 else 12) if zero_optimizer is not None else 0
        self._master: dict[int, list] = {}  # storage key of the stepped tensor -> pieces
        self._model_copy: list = []  # model-copy pieces, for max_drift() and for fixed-fill slices at attach
        self._handles: list = []
        self._wrapped = False
        self._previous_step = None
        self.attached = False
        self.restores = 0
        self.base_check = None  # set by build_deepspeed_enforcer

    # ------------------------------------------------------------------ planning
    def _plan(self) -> None:
        self._master.clear()
        self._model_copy.clear()
        for s in self.slices:
            p = s.param
            if self.stage == 3:
                self._plan_zero3(s, p)
            elif self.stage == 12:
                self._plan_zero12(s, p)
            else:  # stage 0, fp32: the model parameter is the master
                piece = _FullPiece(lambda p=p: p.data, s.axis, s.index, self._initial_full(s, p.data))
                self._master.setdefault(_storage_key(p), []).append(piece)

    def _initial_full(self, s: FrozenSlice, t: torch.Tensor) -> torch.Tensor:
        cur = t.index_select(s.axis, s.index)
        return cur.clone() if s.fill is None else torch.full_like(cur, s.fill)

    def _initial_flat(self, s: FrozenSlice, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cur = t.index_select(0, pos)
        return cur.clone() if s.fill is None else torch.full_like(cur, s.fill)

    def _plan_zero12(self, s: FrozenSlice, p: nn.Parameter) -> None:
        self._model_copy.append(_FullPiece(lambda p=p: p.data, s.axis, s.index, self._initial_full(s, p.data)))
        mapping = p._hp_mapping
        if mapping is None:  # this rank owns no fragment of p
            return
        addr = mapping.lp_fragment_address
        pos = _local(_flat_positions(s, tuple(p.shape)), addr.start, addr.numel).to(p.device)
        if pos.numel() == 0:
            return
        get = (lambda p=p: p._hp_mapping.hp_fragment)
        frag = get()
        self._master.setdefault(_storage_key(frag), []).append(_Piece(get, pos, self._initial_flat(s, frag, pos)))

    def _plan_zero3(self, s: FrozenSlice, p: nn.Parameter) -> None:
        opt = p._z3_optimizer
        shape = tuple(p.ds_shape)
        numel = int(p.ds_numel)
        part = int(p.ds_tensor.numel())
        rank = int(opt._get_param_partition_rank(p))
        flat = _flat_positions(s, shape)
        pos = _local(flat[flat < numel], rank * part, part).to(p.ds_tensor.device)
        if getattr(p, "ds_persist", False) and p.data.numel() == numel:
            # A small parameter keeps a full copy in p.data (refreshed from the partitions after each step); before
            # the first forward of a raw engine it is not materialised yet and is gathered from ds_tensor later.
            self._model_copy.append(_FullPiece(lambda p=p: _full_or_empty(p, shape), s.axis, s.index,
                                               self._initial_full(s, p.data.view(shape))))
        if pos.numel() == 0:
            return
        local = (lambda p=p: p.ds_tensor.data.view(-1))
        self._model_copy.append(_Piece(local, pos, self._initial_flat(s, local(), pos)))
        group_idx, offset, n = opt.grad_position[opt.get_param_id(p)]
        get = (lambda opt=opt, g=group_idx, o=offset, n=n: opt.fp32_partitioned_groups_flat[g].narrow(0, o, n))
        frag = get()
        self._master.setdefault(_storage_key(frag), []).append(_Piece(get, pos, self._initial_flat(s, frag, pos)))

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> "DeepSpeedEnforcer":
        """Record this rank's frozen values, register gradient hooks, wrap the inner optimizer's ``step``."""
        if self.attached:
            return self
        with torch.no_grad():
            self._plan()
            # Fixed-fill slices (LoRA rows/columns at zero) must hold from the start, in every copy.
            for piece in self._model_copy:
                piece.restore()
            self._restore_all()
        for s in self.slices:
            axis, index = s.axis, s.index
            self._handles.append(s.param.register_hook(lambda g, a=axis, i=index: g.index_fill(a, i, 0)))
        self._wrap_step()
        self.attached = True
        return self

    def _wrap_step(self) -> None:
        """Make this optimizer instance's ``step`` restore right after it returns (LR schedulers' own per-instance
        wrappers, if any, are kept underneath)."""
        opt = self.optimizer
        current = vars(opt).get("step")
        if getattr(current, "__ssah_enforcer__", None) is not None and current.__ssah_enforcer__.attached:
            raise UnsupportedSetupError(
                f"ssah-plugin is already attached to this {type(opt).__name__} (two SSAHCallback or deepspeed_enforce "
                "calls on one engine?). Fix: attach one enforcer per engine, or detach() the first one")
        inner_step = opt.step
        enforcer = self

        def step(*args, **kwargs):
            out = inner_step(*args, **kwargs)
            if enforcer._wrapped:
                enforcer._restore_stepped(opt)
            return out

        step.__ssah_enforcer__ = self  # type: ignore[attr-defined]
        self._previous_step = current
        opt.step = step
        self._wrapped = True

    def _unwrap_step(self) -> None:
        if not self._wrapped:
            return
        self._wrapped = False  # our wrapper becomes a pass-through if someone wrapped on top of it
        if getattr(vars(self.optimizer).get("step"), "__ssah_enforcer__", None) is self:
            if self._previous_step is None:
                del self.optimizer.step
            else:
                self.optimizer.step = self._previous_step

    @torch.no_grad()
    def _restore_stepped(self, opt) -> None:
        """Restore the pieces of the tensors this (sub-)group step just updated (all pieces if none is known)."""
        hit = False
        for group in opt.param_groups:
            for t in group["params"]:
                pieces = self._master.get(_storage_key(t))
                if pieces:
                    hit = True
                    for piece in pieces:
                        piece.restore()
        if not hit:
            self._restore_all()
        self.restores += 1

    @torch.no_grad()
    def _restore_all(self) -> None:
        for pieces in self._master.values():
            for piece in pieces:
                piece.restore()

    def after_step(self) -> None:
        """No-op: the restore already ran inside the optimizer step (kept for the common enforcer interface)."""
        if not self._wrapped and self.attached:
            self._restore_all()

    def detach(self) -> None:
        """Remove the gradient hooks and the step wrapper (the recorded values are kept for :meth:`max_drift`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._unwrap_step()
        self.attached = False

    # ------------------------------------------------------------------ checks
    @torch.no_grad()
    def max_drift(self) -> float:
        """Largest change of any frozen value on this rank, in the fp32 master fragments and the model copy.

        Local only (no collective): call it on every rank and reduce yourself if you need a global answer.
        """
        worst = 0.0
        for pieces in self._master.values():
            for piece in pieces:
                worst = max(worst, piece.drift())
        for piece in self._model_copy:
            worst = max(worst, piece.drift())
        return worst

    @property
    def frozen_elements(self) -> int:
        return sum(s.numel for s in self.slices)

    @property
    def snapshot_bytes(self) -> int:
        """Memory held on this rank: recorded values plus their int64 positions (master and model-copy checks)."""
        total = 0
        for p in [p for ps in self._master.values() for p in ps] + self._model_copy:
            total += p.snap.numel() * p.snap.element_size()
            if isinstance(p, _Piece):
                total += p.pos.numel() * p.pos.element_size()
        return total


def _zero3_get_tensor(name: str, param: nn.Parameter) -> torch.Tensor | None:
    """The full value of a ZeRO-3 parameter for fingerprinting (a collective: every rank calls it in order)."""
    deepspeed = require("deepspeed", "deepspeed", "ssah-plugin under DeepSpeed ZeRO-3")
    if not hasattr(param, "ds_id"):
        return param
    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.data.detach().clone()


def build_deepspeed_enforcer(mask, model: nn.Module, policy: str | None, optimizer,
                             check_fingerprint: bool = True, check_values: bool | None = None) -> DeepSpeedEnforcer:
    """Validate ``mask`` against a DeepSpeed model and return an enforcer ready to :meth:`~DeepSpeedEnforcer.attach`.

    ``optimizer`` is whatever the host holds: accelerate's ``DeepSpeedOptimizerWrapper``, the engine's ZeRO optimizer,
    or (for raw engines) ``engine.optimizer``. Must run on every rank (ZeRO-3 fingerprinting and the base-value check
    gather parameters; every rank computes the same answer, so a refusal is raised on every rank).
    """
    zero_opt, torch_opt = _find_zero_optimizer(optimizer)
    _check_setup(zero_opt, model)
    if is_schedule_free(torch_opt):
        raise UnsupportedSetupError(
            f"schedule-free optimizer {type(torch_opt).__name__} under DeepSpeed is not supported by ssah-plugin: it "
            "keeps a second copy of every weight in its state (z), which ZeRO partitions and ssah-plugin does not "
            "restore. Fix: use AdamW (optim=\"adamw_torch\") under DeepSpeed, or train the schedule-free optimizer "
            "without DeepSpeed (single process or DDP)")
    zero3 = any(hasattr(p, "ds_tensor") for p in model.parameters())
    get_tensor = _zero3_get_tensor if zero3 else None
    mask.validate(model, check_fingerprint=check_fingerprint, get_tensor=get_tensor)
    slices = plan_frozen_slices(mask, model, policy)
    report = run_base_check(mask, model, policy, check_values=check_fingerprint if check_values is None else
                            check_values, get_tensor=get_tensor)
    enforcer = DeepSpeedEnforcer(slices, model, zero_opt, torch_opt)
    enforcer.base_check = report
    return enforcer


def deepspeed_enforce(engine, mask, policy: str | None = None, *, check_fingerprint: bool = True
                      ) -> DeepSpeedEnforcer:
    """Keep ``mask``'s frozen units bit-exact in a raw DeepSpeed engine (call on every rank).

    Call it after ``deepspeed.initialize`` (and after ``engine.load_checkpoint`` when resuming), before the first
    ``engine.backward``. Nothing else changes in your loop: the restore runs inside ``engine.step()``.

    Example:
        >>> engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)  # doctest: +SKIP
        >>> enforcer = ssah_plugin.deepspeed_enforce(engine, "mask.safetensors")        # doctest: +SKIP
        >>> ...  # train as usual; enforcer.max_drift() == 0.0 on every rank
    """
    optimizer = getattr(engine, "optimizer", None)
    model = getattr(engine, "module", None)
    if model is None or optimizer is None:
        raise UnsupportedSetupError(
            "deepspeed_enforce needs a DeepSpeed engine with an optimizer: call it with the first value returned by "
            "deepspeed.initialize(model=..., optimizer=... or a config with an 'optimizer' block)")
    m = load_mask(mask)
    enforcer = build_deepspeed_enforcer(m, model, policy, optimizer, check_fingerprint=check_fingerprint)
    return enforcer.attach()


def refuse_under_zero(slices: list[FrozenSlice]):
    """Guard for :class:`~ssah_plugin.SSAHOptimizer`: refuse at the first ``backward()`` if ZeRO took the model over.

    A wrapped torch optimizer handed to DeepSpeed (``Trainer(optimizers=...)`` with ``deepspeed=``, or
    ``deepspeed.initialize(optimizer=...)``) only sees ZeRO's flat fp32 partitions, and a DeepSpeed config with an
    ``"optimizer"`` block drops it silently. Either way its restore cannot keep the master weights exact, so a tensor
    hook on one frozen parameter raises during the first backward, before any weight changes. Returns the hook handle
    (``None`` when nothing is frozen).
    """
    params = [s.param for s in slices if s.param.requires_grad]
    if not params:
        return None
    p = params[0]
    checked = [False]

    def _guard(grad: torch.Tensor) -> None:
        if checked[0]:
            return None
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            raise UnsupportedSetupError(
                "SSAHOptimizer is used under DeepSpeed ZeRO: ZeRO steps flat fp32 partitions (or replaces the wrapped "
                "optimizer when the DeepSpeed config has an 'optimizer' block), so the wrapper cannot keep frozen "
                "units exact. Fix: pass the plain torch optimizer and add callbacks=[SSAHCallback(mask)] to the "
                "Trainer, or call ssah_plugin.deepspeed_enforce(engine, mask) after deepspeed.initialize")
        checked[0] = True
        return None

    return p.register_hook(_guard)
