"""Set-up shared by every host: load and validate the mask, plan the slices, pick the engine for the host.

Everything that can be refused is refused here, before the first training step.
"""
from __future__ import annotations

import logging
import os
from typing import Protocol, Union

import torch
from torch import nn

from .errors import UnsupportedSetupError
from .freeze import FreezeEngine, GradMode
from .mask import Mask
from .resolve import plan_frozen_slices

__all__ = ["Enforcer", "MaskLike", "load_mask", "build_enforcer", "detect_host", "unwrap_optimizer"]

logger = logging.getLogger(__name__)

MaskLike = Union[str, os.PathLike, Mask]


class Enforcer(Protocol):
    """What every host engine offers (plain PyTorch: :class:`~ssah_plugin.freeze.FreezeEngine`)."""

    slices: list

    def attach(self) -> "Enforcer": ...
    def after_step(self) -> None: ...
    def detach(self) -> None: ...
    def max_drift(self) -> float: ...
    @property
    def frozen_elements(self) -> int: ...


def load_mask(mask: MaskLike) -> Mask:
    """A :class:`Mask` from a path or an existing object (type errors name what was passed)."""
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, (str, os.PathLike)):
        return Mask.load(mask)
    raise TypeError(f"mask must be a path to a mask file or an ssah_plugin.Mask, got {type(mask).__name__}")


def unwrap_optimizer(optimizer) -> list:
    """The chain of optimizers from the outermost wrapper inwards (accelerate, DeepSpeed, ours)."""
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def _is_deepspeed(model: nn.Module | None, optimizer) -> bool:
    names = [type(o).__module__ for o in unwrap_optimizer(optimizer)]
    if model is not None:
        names.append(type(model).__module__)
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            return True
    return any(n.startswith("deepspeed") for n in names)


def detect_host(model: nn.Module, optimizer=None) -> str:
    """``"deepspeed"``, ``"torch"`` (plain, DDP, accelerate without DeepSpeed); FSDP is refused."""
    if _is_deepspeed(model, optimizer):
        return "deepspeed"
    if any(type(m).__name__ in ("FullyShardedDataParallel", "FSDPModule") for m in model.modules()) or any(
        type(p).__name__ == "DTensor" for p in model.parameters()
    ):
        raise UnsupportedSetupError(
            "FSDP is not supported by ssah-plugin yet: its sharded parameters cannot be restored slice by slice. "
            "Use DeepSpeed ZeRO-3 for sharded training (integrations/deepspeed/zero3.json) or single-process/DDP"
        )
    return "torch"


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def build_enforcer(
    mask: MaskLike,
    model: nn.Module,
    policy: str | None = None,
    *,
    optimizer=None,
    check_fingerprint: bool = True,
    grad_mode: GradMode | str = "auto",
) -> tuple[Mask, Enforcer]:
    """Validate ``mask`` against ``model`` and return an attached-ready enforcer for the model's host.

    ``grad_mode="auto"`` uses in-place post-accumulation masking in a single process and tensor hooks (which run
    before any reduction) when several processes train together.
    """
    mask = load_mask(mask)
    from ._peft import check_peft_setup

    check_peft_setup(model)  # DoRA, PiSSA, prefix tuning, LoHa...: refused before any other check
    host = detect_host(model, optimizer)
    if host == "deepspeed":
        from ._deepspeed import build_deepspeed_enforcer

        return mask, build_deepspeed_enforcer(mask, model, policy, optimizer, check_fingerprint=check_fingerprint)
    mask.validate(model, check_fingerprint=check_fingerprint)
    slices = plan_frozen_slices(mask, model, policy)
    if grad_mode == "auto":
        grad_mode = "tensor" if _distributed() else "post_accumulate"
    return mask, FreezeEngine(slices, grad_mode=grad_mode)  # type: ignore[arg-type]
