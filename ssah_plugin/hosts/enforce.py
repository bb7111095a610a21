"""Set-up shared by every host: load and validate the mask, plan the slices, pick the engine for the host.

Everything that can be refused is refused here, before the first training step.
"""
from __future__ import annotations

import logging
import os
from typing import Protocol, Union

import torch
from torch import nn

from ssah_plugin.core.engine import FreezeEngine, GradMode
from ssah_plugin.core.mask import Mask
from ssah_plugin.core.plan import plan_frozen_slices
from ssah_plugin.errors import UnsupportedSetupError

__all__ = ["Enforcer", "MaskLike", "load_mask", "build_enforcer", "detect_host", "unwrap_optimizer"]

logger = logging.getLogger(__name__)

MaskLike = Union[str, os.PathLike, Mask]


class Enforcer(Protocol):
    """What every host engine offers (plain PyTorch: :class:`~ssah_plugin.core.engine.FreezeEngine`)."""

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
    check_values: bool | None = None,
    grad_mode: GradMode | str = "auto",
    cover_untrainable: bool = True,
) -> tuple[Mask, Enforcer]:
    """Validate ``mask`` against ``model`` and return an attached-ready enforcer for the model's host.

    ``check_values`` (default: ``check_fingerprint``) compares the values about to be frozen with the base digests
    stored in the mask (:func:`ssah_plugin.core.digest.check_base_values`) and raises
    :class:`~ssah_plugin.errors.FrozenValuesError` on any difference; its report is ``enforcer.base_check``.
    ``grad_mode="auto"`` uses in-place post-accumulation masking in a single process and tensor hooks (which run
    before any reduction) when several processes train together. ``cover_untrainable`` also keeps the frozen slices
    of parameters that do not require gradients now (progressive unfreezing); PEFT's frozen base weights excepted.
    """
    mask = load_mask(mask)
    from ssah_plugin.hosts.peft import check_peft_setup

    check_peft_setup(model)  # DoRA, PiSSA, prefix tuning, LoHa...: refused before any other check
    if check_values is None:
        check_values = check_fingerprint
    host = detect_host(model, optimizer)
    if host == "deepspeed":
        from ssah_plugin.hosts.deepspeed import build_deepspeed_enforcer

        return mask, build_deepspeed_enforcer(mask, model, policy, optimizer, check_fingerprint=check_fingerprint,
                                              check_values=check_values)
    mask.validate(model, check_fingerprint=check_fingerprint)
    slices = plan_frozen_slices(mask, model, policy)
    report = run_base_check(mask, model, policy, check_values=check_values)
    if grad_mode == "auto":
        grad_mode = "tensor" if _distributed() else "post_accumulate"
    engine = FreezeEngine(slices, grad_mode=grad_mode, cover_untrainable=cover_untrainable,  # type: ignore[arg-type]
                          model=model)
    if optimizer is not None:
        engine.bind_optimizer(optimizer)
    engine.base_check = report
    return mask, engine


def run_base_check(mask: Mask, model: nn.Module, policy: str | None, *, check_values: bool, get_tensor=None):
    """:func:`ssah_plugin.core.digest.check_base_values`, raising :class:`FrozenValuesError` when ``check_values``."""
    from ssah_plugin.core.digest import check_base_values
    from ssah_plugin.errors import FrozenValuesError

    report = check_base_values(mask, model, policy, get_tensor=get_tensor)
    if check_values and report.mismatched:
        n_bad = sum(m[1] for m in report.mismatched)
        first = report.mismatched[0]
        peft = any(type(m).__module__.startswith("peft.") for m in model.modules())
        causes = ("the model (or the checkpoint being resumed) was fine-tuned without this mask or with a narrower "
                  "policy, some unit's weights were replaced, or the model is another one")
        if peft:
            causes += ("; with PEFT: an initialisation that rewrites the base weights (PiSSA, OLoRA, LoftQ, CorDA, "
                       "EVA, ...) or merged adapters")
        raise FrozenValuesError(
            f"the values ssah-plugin is about to freeze are not the mask's base values: {n_bad} frozen unit slice(s) "
            f"differ in {len(report.mismatched)} tensor(s) (first: {first[0]}, {first[1]} of {first[2]} frozen "
            f"units). Cause: {causes}. Fix: start from the base model the mask was made from (or resume a checkpoint "
            "trained with this mask and policy), or pass the mask made for these weights (ssah-plugin locate "
            "--model ...); check_fingerprint=False skips this check if you really mean to freeze other values")
    if check_values and not report.complete:
        logger.info("ssah-plugin: base values not checked for %d frozen slice(s) (first: %s)",
                    len(report.unchecked), report.unchecked[0] if report.unchecked else "-")
    return report
