"""Set-up shared by every host: validate the mask, plan the slices, pick the engine for the host.

Everything that can be refused is refused here, before the first training step.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ssah_plugin.core.engine import (
    FreezeEngine,
    GradMode,
    SnapshotDevice,
    check_snapshot_device,
)
from ssah_plugin.core.mask import Mask
from ssah_plugin.core.plan import plan_frozen_slices
from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.hosts.deepspeed import build_deepspeed_enforcer
from ssah_plugin.hosts.loaded import loaded_class
from ssah_plugin.hosts.peft import check_peft_setup
from ssah_plugin.hosts.setup import Enforcer, MaskLike, load_mask, run_base_check
from ssah_plugin.hosts.zero import uses_deepspeed

__all__ = ["build_enforcer", "detect_host"]

logger = logging.getLogger(__name__)


def _is_fsdp(model: nn.Module) -> bool:
    """FSDP (``FullyShardedDataParallel`` or FSDP2's ``fully_shard``) or DTensor parameters (tensor parallelism)."""
    kinds = tuple(c for c in (loaded_class("torch.distributed.fsdp", "FullyShardedDataParallel"),
                              loaded_class("torch.distributed.fsdp", "FSDPModule")) if c is not None)
    dtensor = loaded_class("torch.distributed.tensor", "DTensor")
    return bool(kinds) and any(isinstance(m, kinds) for m in model.modules()) or \
        dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def detect_host(model: nn.Module, optimizer: object = None) -> str:
    """``"deepspeed"``, ``"torch"`` (plain, DDP, accelerate without DeepSpeed); FSDP and DTensors are refused."""
    if uses_deepspeed(model, optimizer):  # ZeRO or not (an fp16 optimizer without ZeRO is refused there)
        return "deepspeed"
    if _is_fsdp(model):
        raise UnsupportedSetupError(
            "FSDP (and DTensor-sharded parameters) is not supported by ssah-plugin yet: its sharded parameters cannot "
            "be restored slice by slice. Use DeepSpeed ZeRO-3 for sharded training (integrations/deepspeed/zero3.json) "
            "or single-process/DDP")
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
    snapshot_device: SnapshotDevice = "param",
) -> tuple[Mask, Enforcer]:
    """Validate ``mask`` against ``model`` and return an attached-ready enforcer for the model's host.

    ``check_values`` (default: ``check_fingerprint``) compares the values about to be frozen with the base digests
    stored in the mask (:func:`ssah_plugin.core.digest.check_base_values`) and raises
    :class:`~ssah_plugin.errors.FrozenValuesError` on any difference; its report is ``enforcer.base_check``.
    ``grad_mode="auto"`` uses in-place post-accumulation masking in a single process and tensor hooks (which run
    before any reduction) when several processes train together. ``cover_untrainable`` also keeps the frozen slices
    of parameters that do not require gradients now (progressive unfreezing); PEFT's frozen base weights excepted.
    ``snapshot_device`` (``"param"`` or ``"cpu"``): where the plain PyTorch engine keeps its snapshot
    (:class:`~ssah_plugin.core.engine.FreezeEngine`); DeepSpeed keeps its own per-rank fragments (``"param"`` only).

    Runs once at set-up, before the first forward: nothing here runs during ``backward()`` or ``optimizer.step()``.
    """
    check_snapshot_device(snapshot_device)
    mask = load_mask(mask, policy)
    check_peft_setup(model)  # DoRA, PiSSA, prefix tuning, LoHa...: refused before any other check
    if check_values is None:
        check_values = check_fingerprint
    host = detect_host(model, optimizer)
    if host == "deepspeed":
        if snapshot_device != "param":
            raise UnsupportedSetupError(
                f"snapshot_device={snapshot_device!r} is not supported under DeepSpeed: each rank keeps only the "
                "frozen values of its own ZeRO partitions, next to them. Fix: leave snapshot_device at 'param'")
        return mask, build_deepspeed_enforcer(mask, model, policy, optimizer, check_fingerprint=check_fingerprint,
                                              check_values=check_values)
    mask.validate(model, check_fingerprint=check_fingerprint)
    slices = plan_frozen_slices(mask, model, policy)
    report = run_base_check(mask, model, policy, check_values=check_values)
    if grad_mode == "auto":
        grad_mode = "tensor" if _distributed() else "post_accumulate"
    engine = FreezeEngine(slices, grad_mode=grad_mode, cover_untrainable=cover_untrainable,  # type: ignore[arg-type]
                          model=model, snapshot_device=snapshot_device)
    if optimizer is not None:
        engine.bind_optimizer(optimizer)
    engine.base_check = report
    return mask, engine
