"""Exceptions raised by ssah-plugin. Every one names the cause and the fix."""
from __future__ import annotations

__all__ = [
    "SSAHError",
    "MaskFormatError",
    "MaskMismatchError",
    "FrozenValuesError",
    "ResumeMismatchError",
    "UnsupportedArchitectureError",
    "UnsupportedSetupError",
    "DataError",
    "MissingExtraError",
]


class SSAHError(Exception):
    """Base class of every error this library raises on purpose."""


class MaskFormatError(SSAHError, ValueError):
    """The mask file cannot be read: not safetensors, truncated, corrupt, or an unknown format version."""


class MaskMismatchError(SSAHError, ValueError):
    """The mask does not fit the live model. ``problems`` lists every mismatch found (not only the first)."""

    def __init__(self, problems: list[str], *, context: str = "", limit: int = 20):
        self.problems = list(problems)
        shown = "\n  - ".join(self.problems[:limit])
        more = f"\n  ... and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        head = context or "the mask does not match this model"
        super().__init__(
            f"{head} ({len(self.problems)} problem(s)):\n  - {shown}{more}\n"
            "Fix: build the mask from this exact model (ssah-plugin locate --model ...), or train the model the "
            "mask was made for."
        )


class FrozenValuesError(SSAHError, ValueError):
    """The values about to be frozen are not the mask's base values (checked with the digests of format v2)."""


class ResumeMismatchError(SSAHError, ValueError):
    """A resumed checkpoint was trained with another frozen set, or without ssah-plugin, and cannot be continued."""


class UnsupportedArchitectureError(SSAHError, ValueError):
    """The model's architecture is unknown; register an :class:`ssah_plugin.core.units.ArchSpec` for it."""


class UnsupportedSetupError(SSAHError, RuntimeError):
    """A training setup whose frozen units this library cannot keep exact; raised at setup, never mid-training."""


class DataError(SSAHError, ValueError):
    """Calibration or evaluation data is empty, malformed or unusable."""


class MissingExtraError(SSAHError, ImportError):
    """An optional framework is needed; the message names the pip extra that installs it."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'ssah-plugin[{extra}]'"
        )


def require(module: str, extra: str, purpose: str):
    """Import ``module`` lazily, raising :class:`MissingExtraError` that names the extra if it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised by tests with a fake import failure
        raise MissingExtraError(module.split(".")[0], extra, purpose) from exc
