"""ssah-plugin: keep a chat model's safety-critical units frozen, bit-exact, while you fine-tune it.

Reference implementation of "Superficial Safety Alignment Hypothesis" (Li & Kim, ICLR 2026).

Tiers of use:

1. One line in a Trainer / TRL script: ``callbacks=[SSAHCallback("mask.safetensors")]``.
2. Custom loops: ``SSAHOptimizer(optimizer, model, "mask.safetensors")``.
3. Locate / verify / evaluate from Python: ``from ssah_plugin.locate import locate`` (the submodule shares the
   function's name, so the function is not re-exported here), :func:`verify_checkpoint`, :func:`evaluate_checkpoint`.
4. Building blocks: :class:`Mask`, :func:`describe_units`, :class:`FreezeEngine`, :func:`plan_frozen_slices`.
"""
from ._version import __version__
from .errors import (
    DataError,
    FrozenValuesError,
    MaskFormatError,
    MaskMismatchError,
    MissingExtraError,
    ResumeMismatchError,
    SSAHError,
    UnsupportedArchitectureError,
    UnsupportedSetupError,
)
from .freeze import FreezeEngine
from .mask import Mask
from .optim import SSAHOptimizer
from .replay import with_refusal_replay
from .resolve import FrozenSlice, plan_frozen_slices
from .units import ArchSpec, describe_units, register_architecture

__all__ = [
    "__version__",
    "SSAHCallback",
    "TokenwiseConstraint",
    "SSAHOptimizer",
    "with_refusal_replay",
    "deepspeed_enforce",
    "LocateConfig",
    "verify_checkpoint",
    "RefusalJudge",
    "evaluate_checkpoint",
    "prefill_attack",
    "framing_attack",
    "Mask",
    "ArchSpec",
    "register_architecture",
    "describe_units",
    "FreezeEngine",
    "FrozenSlice",
    "plan_frozen_slices",
    "SSAHError",
    "MaskFormatError",
    "MaskMismatchError",
    "UnsupportedArchitectureError",
    "UnsupportedSetupError",
    "DataError",
    "MissingExtraError",
    "FrozenValuesError",
    "ResumeMismatchError",
]


# Names whose modules import transformers / generation code (seconds): loaded on first access.
_LAZY = {
    "SSAHCallback": "callback",
    "TokenwiseConstraint": "constrained",  # Qi et al. 2024 Eq. 3 as compute_loss_func + callback
    "deepspeed_enforce": "_deepspeed",  # raw deepspeed.initialize users; DeepSpeed itself is imported lazily
    "LocateConfig": "locate",
    "verify_checkpoint": "verify",
    "RefusalJudge": "judge",
    "evaluate_checkpoint": "evaluate",
    "prefill_attack": "attacks",
    "framing_attack": "attacks",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ssah_plugin' has no attribute {name!r}")
