"""``SSAHOptimizer``: the same guarantee for custom PyTorch / accelerate training loops.

    optimizer = SSAHOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1),
                              model, "mask.safetensors")

When it acts: at construction it validates the mask, checks that the values to freeze are the mask's base values
(digests), snapshots the frozen slices and registers gradient hooks (so the *next* ``backward()`` already produces
zero gradients on frozen slices, before you clip); every ``step()`` runs the wrapped optimizer's step and then
writes the snapshot back, before you call ``zero_grad()``. Parameters that do not require gradients at
construction are covered too: unfreeze them later (progressive unfreezing) and their frozen units stay exact, with
gradient hooks added before their first backward. A cast of the model (``model.to(torch.bfloat16)``) after
construction is followed. Schedule-free optimizers (``schedulefree``) are exact too: their ``z`` state is kept on
the frozen values, and ``train()`` / ``eval()`` are forwarded.
Everything else (``param_groups``, ``state``, ``state_dict``, ``zero_grad``, LR schedulers, accelerate's
``prepare``) goes to the wrapped optimizer.

Under DeepSpeed use :func:`ssah_plugin.deepspeed_enforce` on the engine instead (ZeRO replaces the optimizer's
parameters with flat partitions, so a wrapper around your optimizer never sees the model's tensors).
"""
from __future__ import annotations

import torch
from torch import nn

from ssah_plugin.core.engine import SnapshotDevice
from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.hosts.deepspeed import refuse_under_zero
from ssah_plugin.hosts.enforce import build_enforcer
from ssah_plugin.hosts.setup import MaskLike
from ssah_plugin.hosts.zero import zero_stage

__all__ = ["SSAHOptimizer"]


class SSAHOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that ``model``'s frozen units stay bitwise equal to their values at wrap time.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over ``model``'s parameters.
        model: the model (wrappers such as DDP or PEFT are fine).
        mask: mask file, folder or Hub repo spec (``"org/name:policy"``, docs/hub.md) or :class:`~ssah_plugin.Mask`.
        policy: which units to freeze; default: the mask's default policy.
        check_fingerprint: refuse weights other than those the mask was made from.
        grad_mode: see :class:`~ssah_plugin.core.engine.FreezeEngine`; ``"auto"`` picks per host.
        snapshot_device: where the snapshot of the frozen values lives: ``"param"`` (default, next to each
            parameter) or ``"cpu"`` (host memory, pinned when the parameters are on CUDA; restored with non-blocking
            copies on the current stream, before the next forward reads the weights).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, mask: MaskLike, policy: str | None = None,
                 *, check_fingerprint: bool = True, grad_mode: str = "auto", snapshot_device: SnapshotDevice = "param"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if zero_stage(model) == 3:
            raise UnsupportedSetupError(
                "SSAHOptimizer cannot wrap an optimizer of a DeepSpeed model: ZeRO replaces the optimizer's parameters "
                "with flat partitions. Call ssah_plugin.deepspeed_enforce(engine, mask) after deepspeed.initialize")
        self._wrapping = True  # add_param_group calls from torch's __init__ must not reach the inner optimizer
        self.optimizer = optimizer
        self.mask, self.enforcer = build_enforcer(mask, model, policy, optimizer=None,
                                                  check_fingerprint=check_fingerprint, grad_mode=grad_mode,
                                                  cover_untrainable=True, snapshot_device=snapshot_device)
        self.enforcer.bind_optimizer(optimizer)  # schedule-free: its z copy of the weights is kept exact too
        self.policy = policy or self.mask.default_policy
        self._check_params_covered(model)
        # Initialise torch's Optimizer bookkeeping (hooks, profiling names), then share the inner state.
        super().__init__([{"params": g["params"]} for g in optimizer.param_groups], dict(optimizer.defaults))
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self._wrapping = False
        self.enforcer.attach()
        self._zero_guard = refuse_under_zero(self.enforcer.slices)  # refuses at the first backward under ZeRO

    def _check_params_covered(self, model: nn.Module) -> None:
        owned = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        trainable = [s for s in self.enforcer.slices if s.param.requires_grad]
        if trainable and not any(id(s.param) in owned for s in trainable):
            raise UnsupportedSetupError(
                "none of the frozen parameters is in this optimizer: was it built for another model (or before PEFT "
                "wrapped the model)? Build the optimizer from the model you pass here")

    def step(self, closure=None):  # type: ignore[override]
        """Run the wrapped optimizer's step, then restore the frozen slices bitwise (before you call ``zero_grad()``).

        The gradients it steps on were masked during ``backward()`` already (so clipping between ``backward()`` and
        ``step()`` ignores frozen entries).
        """
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.enforcer.after_step()
        return loss

    def __getattr__(self, name: str):
        # Only reached for attributes not found normally: schedule-free optimizers' train() / eval() (and the
        # train_mode flag) are the wrapped optimizer's, and exist here exactly when they exist there, so
        # `hasattr(optimizer, "train")` (transformers, accelerate) answers as for the wrapped one.
        if name in ("train", "eval", "train_mode"):
            inner = self.__dict__.get("optimizer")
            if inner is not None and hasattr(inner, name):
                return getattr(inner, name)
        raise AttributeError(f"{type(self).__name__!s} (wrapping {type(self.__dict__.get('optimizer')).__name__}) has "
                             f"no attribute {name!r}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)
        self.state = self.optimizer.state
        self.param_groups = self.optimizer.param_groups

    def add_param_group(self, param_group) -> None:
        if getattr(self, "_wrapping", True):  # during torch.optim.Optimizer.__init__: local bookkeeping only
            super().add_param_group(param_group)
        else:
            self.optimizer.add_param_group(param_group)
            self.param_groups = self.optimizer.param_groups

    def max_drift(self) -> float:
        """Largest absolute change of any frozen value since wrapping (0.0 when exact)."""
        return self.enforcer.max_drift()

    def remove_hooks(self) -> None:
        self.enforcer.detach()

    def __repr__(self) -> str:
        return f"SSAHOptimizer({self.optimizer!r}, policy={self.policy!r})"
