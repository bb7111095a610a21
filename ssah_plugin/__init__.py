"""ssah-plugin: keep a chat model's safety-critical units frozen, bit-exact, while you fine-tune it.

Reference implementation of "Superficial Safety Alignment Hypothesis" (Li & Kim, ICLR 2026).

Tiers of use:

1. One line in a Trainer / TRL script: ``callbacks=[SSAHCallback("mask.safetensors")]``.
2. Custom loops: ``SSAHOptimizer(optimizer, model, "mask.safetensors")``.
3. Building blocks: :class:`Mask`, :func:`describe_units`, :class:`FreezeEngine`, :func:`plan_frozen_slices`.
"""
from ._version import __version__
from .errors import (
    DataError,
    MaskFormatError,
    MaskMismatchError,
    MissingExtraError,
    SSAHError,
    UnsupportedArchitectureError,
    UnsupportedSetupError,
)
from .freeze import FreezeEngine
from .mask import Mask
from .optim import SSAHOptimizer
from .resolve import FrozenSlice, plan_frozen_slices
from .units import ArchSpec, describe_units, register_architecture

__all__ = [
    "__version__",
    "SSAHCallback",
    "SSAHOptimizer",
    "deepspeed_enforce",
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
]


def __getattr__(name: str):
    # The callback imports transformers (seconds); load it only when asked for.
    if name == "SSAHCallback":
        from .callback import SSAHCallback

        return SSAHCallback
    if name == "deepspeed_enforce":  # raw deepspeed.initialize users; DeepSpeed itself is imported lazily
        from ._deepspeed import deepspeed_enforce

        return deepspeed_enforce
    raise AttributeError(f"module 'ssah_plugin' has no attribute {name!r}")
