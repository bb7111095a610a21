"""ssah-plugin: keep a chat model's safety-critical units frozen, bit-exact, while you fine-tune it.

Reference implementation of "Superficial Safety Alignment Hypothesis" (Li & Kim, ICLR 2026).

Tiers of use:

1. The recipe that keeps refusals: ``train_dataset = with_refusal_replay(dataset, refusals)`` (docs/replay.md).
2. One line in a Trainer / TRL script: ``callbacks=[SSAHCallback("mask.safetensors")]`` (or ``"org/name:policy"``
   for a mask on the Hugging Face Hub); the token-wise constraint: ``TokenwiseConstraint(aligned).attach(trainer)``.
3. Custom loops: ``SSAHOptimizer(optimizer, model, "mask.safetensors")``.
4. Locate / verify / evaluate from Python: ``from ssah_plugin.locate import locate`` (the subpackage shares the
   function's name, so the function is not re-exported here), :func:`verify_checkpoint`, :func:`evaluate_checkpoint`.
5. Building blocks: :class:`Mask`, :func:`describe_units`, :class:`FreezeEngine`, :func:`plan_frozen_slices`.

The package's layers are described in docs/architecture.md.
"""
from typing import TYPE_CHECKING

from ssah_plugin._version import __version__
from ssah_plugin.core.engine import FreezeEngine
from ssah_plugin.core.mask import Mask
from ssah_plugin.core.plan import FrozenSlice, plan_frozen_slices
from ssah_plugin.core.units import ArchSpec, describe_units, register_architecture
from ssah_plugin.errors import (
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
from ssah_plugin.hosts.optim import SSAHOptimizer
from ssah_plugin.recipes.replay import with_refusal_replay

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
    "SSAHCallback": "ssah_plugin.hosts.callback",
    "TokenwiseConstraint": "ssah_plugin.recipes.constrained",  # Qi et al. 2024 Eq. 3: constraint.attach(trainer)
    "deepspeed_enforce": "ssah_plugin.hosts.deepspeed",  # raw deepspeed.initialize users; DeepSpeed imported lazily
    "LocateConfig": "ssah_plugin.locate",
    "verify_checkpoint": "ssah_plugin.evaluation.verify",
    "RefusalJudge": "ssah_plugin.evaluation.judge",
    "evaluate_checkpoint": "ssah_plugin.evaluation.evaluate",
    "prefill_attack": "ssah_plugin.evaluation.attacks",
    "framing_attack": "ssah_plugin.evaluation.attacks",
}

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time these load on first access
    from ssah_plugin.evaluation.attacks import framing_attack, prefill_attack
    from ssah_plugin.evaluation.evaluate import evaluate_checkpoint
    from ssah_plugin.evaluation.judge import RefusalJudge
    from ssah_plugin.evaluation.verify import verify_checkpoint
    from ssah_plugin.hosts.callback import SSAHCallback
    from ssah_plugin.hosts.deepspeed import deepspeed_enforce
    from ssah_plugin.locate import LocateConfig
    from ssah_plugin.recipes.constrained import TokenwiseConstraint


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ssah_plugin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
