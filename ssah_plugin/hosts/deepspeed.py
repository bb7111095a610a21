"""DeepSpeed host, set-up: find what DeepSpeed really steps, refuse what cannot stay exact, build the enforcer.

Imported by :func:`ssah_plugin.hosts.enforce.build_enforcer` (which picks this host when a DeepSpeed engine is
detected) and by raw DeepSpeed users through :func:`deepspeed_enforce`. DeepSpeed itself is imported only inside
the functions. How the frozen values are kept exact during training is described in
:mod:`ssah_plugin.hosts.zero_enforcer`; everything here runs once, before the first backward.

Refused at set-up (:class:`~ssah_plugin.errors.UnsupportedSetupError`, every message names the cause and the fix): a
DeepSpeed version outside :data:`ssah_plugin.hosts.zero.SUPPORTED_DEEPSPEED`, ZeRO-Offload / ZeRO-Infinity (optimizer
or parameter offload, NVMe swap), fp16 with loss scaling, ZeRO++ secondary partitions (hpZ), DeepSpeed without ZeRO in
reduced precision, schedule-free optimizers, and any DeepSpeed optimizer this host cannot map to fragments.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ssah_plugin.core.engine import is_schedule_free, unwrap_optimizer
from ssah_plugin.core.plan import FrozenSlice, plan_frozen_slices
from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.hosts.setup import load_mask, run_base_check
from ssah_plugin.hosts.zero import (
    check_deepspeed_version,
    find_zero_optimizer,
    is_zero3_partitioned,
    zero_stage,
)
from ssah_plugin.hosts.zero3_read import gather_full, validate_mask
from ssah_plugin.hosts.zero_enforcer import DeepSpeedEnforcer

__all__ = ["DeepSpeedEnforcer", "build_deepspeed_enforcer", "deepspeed_enforce", "refuse_under_zero"]

logger = logging.getLogger(__name__)


def _find_zero_optimizer(optimizer) -> tuple[object | None, torch.optim.Optimizer, int]:
    """(DeepSpeed ZeRO optimizer or None, the torch optimizer that really steps, ZeRO stage) from any wrapper chain."""
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    chain = unwrap_optimizer(optimizer)
    if not chain:
        raise UnsupportedSetupError(
            "ssah-plugin found a DeepSpeed model but no optimizer: pass the engine to ssah_plugin.deepspeed_enforce "
            "after deepspeed.initialize(..., optimizer=...), or use SSAHCallback with a Trainer")
    found = find_zero_optimizer(optimizer)
    if found is not None:
        zero_opt, stage = found
        i = next(k for k, o in enumerate(chain) if o is zero_opt)
        if i + 1 >= len(chain) or not isinstance(chain[i + 1], torch.optim.Optimizer):
            raise UnsupportedSetupError(
                f"DeepSpeed optimizer {type(zero_opt).__name__} wraps no torch optimizer ssah-plugin can hook. Use a "
                "torch optimizer (or the DeepSpeed config 'optimizer' block with \"torch_adam\": true)")
        return zero_opt, chain[i + 1], stage
    inner = chain[-1]
    if any(isinstance(o, DeepSpeedOptimizer) for o in chain) or not isinstance(inner, torch.optim.Optimizer):
        raise UnsupportedSetupError(
            f"DeepSpeed optimizer {type(chain[-1]).__name__} has no fragment mapping ssah-plugin can use. Supported: "
            "ZeRO stages 1, 2, 3 (DeepSpeedZeroOptimizer, BF16_Optimizer, DeepSpeedZeroOptimizer_Stage3) and "
            "stage 0 in fp32. Fix: set zero_optimization.stage to 1, 2 or 3")
    return None, inner, 0


def _check_setup(zero_opt, stage: int, model: nn.Module) -> None:
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
        if stage in (1, 2) and any(not hasattr(p, "_hp_mapping") for p in params):
            problems.append(f"{type(zero_opt).__name__} exposes no tensor-fragment mapping (param._hp_mapping) for "
                            "some parameters. Fix: use a supported deepspeed version")
    if problems:
        raise UnsupportedSetupError("ssah-plugin cannot keep frozen units exact in this DeepSpeed setup:\n  - "
                                    + "\n  - ".join(problems))


def build_deepspeed_enforcer(mask, model: nn.Module, policy: str | None, optimizer,
                             check_fingerprint: bool = True, check_values: bool | None = None) -> DeepSpeedEnforcer:
    """Validate ``mask`` against a DeepSpeed model and return an enforcer ready to :meth:`~DeepSpeedEnforcer.attach`.

    ``optimizer`` is whatever the host holds: accelerate's ``DeepSpeedOptimizerWrapper``, the engine's ZeRO optimizer,
    or (for raw engines) ``engine.optimizer``. Must run on every rank: under ZeRO-3 the fingerprint check combines
    the ranks' samples with one small ``all_reduce`` and the base-value check gathers each parameter that has
    frozen slices (:mod:`ssah_plugin.hosts.zero3_read`); every rank computes the same answer, so a refusal is raised on
    every rank.
    """
    check_deepspeed_version()
    zero_opt, torch_opt, stage = _find_zero_optimizer(optimizer)
    _check_setup(zero_opt, stage, model)
    if is_schedule_free(torch_opt):
        raise UnsupportedSetupError(
            f"schedule-free optimizer {type(torch_opt).__name__} under DeepSpeed is not supported by ssah-plugin: it "
            "keeps a second copy of every weight in its state (z), which ZeRO partitions and ssah-plugin does not "
            "restore. Fix: use AdamW (optim=\"adamw_torch\") under DeepSpeed, or train the schedule-free optimizer "
            "without DeepSpeed (single process or DDP)")
    validate_mask(mask, model, check_fingerprint=check_fingerprint)  # ZeRO-3: samples of the local partitions
    slices = plan_frozen_slices(mask, model, policy)
    report = run_base_check(mask, model, policy, check_values=check_fingerprint if check_values is None else
                            check_values, get_tensor=gather_full if zero_stage(model) == 3 else None)
    enforcer = DeepSpeedEnforcer(slices, model, zero_opt, torch_opt, stage)
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
    m = load_mask(mask, policy)
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
            return
        if is_zero3_partitioned(p) or hasattr(p, "_hp_mapping"):  # ZeRO-3 partitions / ZeRO-1/2 fragment mapping
            raise UnsupportedSetupError(
                "SSAHOptimizer is used under DeepSpeed ZeRO: ZeRO steps flat fp32 partitions (or replaces the wrapped "
                "optimizer when the DeepSpeed config has an 'optimizer' block), so the wrapper cannot keep frozen "
                "units exact. Fix: pass the plain torch optimizer and add callbacks=[SSAHCallback(mask)] to the "
                "Trainer, or call ssah_plugin.deepspeed_enforce(engine, mask) after deepspeed.initialize")
        checked[0] = True
        return

    return p.register_hook(_guard)
