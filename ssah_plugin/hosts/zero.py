"""Which DeepSpeed ZeRO stage manages an object, and which DeepSpeed versions ssah-plugin supports.

The one ZeRO-stage query of the package (:func:`zero_stage`). DeepSpeed is a framework: it is never imported at the
top of this module, and :func:`zero_stage` does not import it at all unless something has imported it already (an
object can only belong to DeepSpeed once DeepSpeed is loaded). Everything here runs at set-up, never inside
``backward()`` or ``optimizer.step()``.
"""
from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from ssah_plugin.core.engine import unwrap_optimizer
from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.hosts.loaded import loaded_class

__all__ = ["SUPPORTED_DEEPSPEED", "check_deepspeed_version", "deepspeed_version", "find_zero_optimizer",
           "is_zero3_partitioned", "uses_deepspeed", "zero_stage"]

#: DeepSpeed versions the 2-rank tests pass on, as (lowest, first unsupported); the same bounds as the ``deepspeed``
#: extra in ``setup.cfg``. ZeRO's fragment layout is internal to DeepSpeed and may change in any minor release.
SUPPORTED_DEEPSPEED = ((0, 19), (0, 20))


def deepspeed_version() -> str | None:
    """The installed DeepSpeed version string, or ``None`` when DeepSpeed is not installed (nothing is imported)."""
    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return None


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_deepspeed_version(version: str | None = None) -> str:
    """Refuse a DeepSpeed outside :data:`SUPPORTED_DEEPSPEED` (raises :class:`UnsupportedSetupError`, with the fix).

    ``version`` defaults to the installed one. Returns the version checked. Called once at set-up by
    :func:`ssah_plugin.hosts.deepspeed.build_deepspeed_enforcer`.
    """
    version = deepspeed_version() if version is None else version
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_DEEPSPEED
    supported = f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"
    if version is None:
        raise UnsupportedSetupError(f"ssah-plugin found a DeepSpeed object but no installed deepspeed distribution. "
                                    f"Fix: pip install 'deepspeed{supported}'")
    mm = _major_minor(version)
    if mm is None or not (lo_major, lo_minor) <= mm < (hi_major, hi_minor):
        raise UnsupportedSetupError(
            f"deepspeed {version} is not supported by ssah-plugin (supported: deepspeed{supported}, the range its "
            "multi-rank tests pass on): ZeRO's partition layout, which the bit-exact restore reads, is internal to "
            f"DeepSpeed and changes between releases. Fix: pip install 'deepspeed{supported}'")
    return version


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ZeRO-3 partitioned parameter (its ``shape`` is a placeholder, values live in shards)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_tensor")


def _stage_of_config(cfg: object) -> int | None:
    """Stage in a DeepSpeed config (a dict or the path of a JSON file); ``None`` for anything else."""
    if isinstance(cfg, (str, Path)):
        path = Path(cfg)
        if not path.is_file():
            return None
        cfg = json.loads(path.read_text())
    if not isinstance(cfg, dict):
        return None
    zero = cfg.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


def find_zero_optimizer(obj: object) -> tuple[object, int] | None:
    """``(optimizer, stage)`` for the first DeepSpeed ZeRO optimizer in ``obj``'s wrapper chain (accelerate, DeepSpeed,
    ours), by ``isinstance``; ``None`` when there is none (or DeepSpeed is not imported)."""
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for opt in unwrap_optimizer(obj):
        if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
            return opt, 3
        if isinstance(opt, DeepSpeedZeroOptimizer):
            return opt, 2 if getattr(opt, "partition_gradients", False) else 1
        if isinstance(opt, BF16_Optimizer):  # DeepSpeed's ZeRO-1 optimizer for bf16 with fp32 gradient accumulation
            return opt, 1
    return None


def uses_deepspeed(*objs: object) -> bool:
    """Whether any of ``objs`` (models, optimizers or wrapper chains) is managed by DeepSpeed, ZeRO or not.

    Unlike ``zero_stage(obj) is not None`` this also sees DeepSpeed without ZeRO (``FP16_Optimizer`` for fp16 / bf16
    at stage 0, an engine at stage 0), which hosts must refuse or handle. By ``isinstance``; never imports DeepSpeed.
    """
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed import DeepSpeedEngine
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer

    for obj in objs:
        if isinstance(obj, DeepSpeedEngine) or zero_stage(obj) is not None:
            return True
        if not isinstance(obj, (nn.Module, torch.Tensor)) and \
                any(isinstance(o, DeepSpeedOptimizer) for o in unwrap_optimizer(obj)):
            return True
    return False


def zero_stage(obj: object) -> int | None:
    """The ZeRO stage (0-3) that manages ``obj``, or ``None`` when it cannot be told from ``obj``.

    ``obj`` may be:

    * a ``deepspeed.DeepSpeedEngine``: its configured stage (0 when DeepSpeed runs without ZeRO);
    * an optimizer or any wrapper chain around one (accelerate's ``DeepSpeedOptimizerWrapper``, the engine's
      ``DeepSpeedZeroOptimizer`` / ``BF16_Optimizer`` / ``DeepSpeedZeroOptimizer_Stage3``): 1, 2 or 3; ``None`` for a
      plain torch optimizer;
    * a model (``nn.Module``) or a parameter: 3 when its parameters are ZeRO-3 partitions, else ``None`` (under
      ZeRO-1/2 the stage lives in the optimizer, not in the parameters: pass the optimizer or the engine);
    * a transformers ``Trainer`` (its engine, else its accelerator, else its arguments), an accelerate
      ``Accelerator`` (its DeepSpeed plugin), ``TrainingArguments`` / ``SFTConfig`` / ... (their DeepSpeed config),
      or a DeepSpeed config itself (dict or JSON path): the configured stage; ``None`` without DeepSpeed.

    Framework objects are recognised with ``isinstance`` against the frameworks' own classes, looked up only in
    modules that are already imported: this function never imports DeepSpeed, transformers or accelerate.
    """
    if obj is None:
        return None
    if isinstance(obj, (dict, str, Path)):
        return _stage_of_config(obj)
    engine_cls = loaded_class("deepspeed.runtime.engine", "DeepSpeedEngine")
    if engine_cls is not None and isinstance(obj, engine_cls):
        return int(obj.zero_optimization_stage())
    if isinstance(obj, torch.Tensor):
        return 3 if is_zero3_partitioned(obj) else None
    if isinstance(obj, nn.Module):
        return 3 if any(is_zero3_partitioned(p) for p in obj.parameters()) else None
    trainer_cls = loaded_class("transformers.trainer", "Trainer")
    if trainer_cls is not None and isinstance(obj, trainer_cls):
        for part in (getattr(obj, "model_wrapped", None), getattr(obj, "accelerator", None), obj.args):
            stage = zero_stage(part)
            if stage is not None:
                return stage
        return None
    accelerator_cls = loaded_class("accelerate.accelerator", "Accelerator")
    if accelerator_cls is not None and isinstance(obj, accelerator_cls):
        plugin = obj.state.deepspeed_plugin
        return None if plugin is None else _stage_of_config(plugin.deepspeed_config)
    args_cls = loaded_class("transformers.training_args", "TrainingArguments")
    if args_cls is not None and isinstance(obj, args_cls):
        hf_config = getattr(obj, "hf_deepspeed_config", None)
        return _stage_of_config(hf_config.config if hf_config is not None else obj.deepspeed)
    found = find_zero_optimizer(obj)
    return None if found is None else found[1]
