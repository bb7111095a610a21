"""Framework classes for ``isinstance`` checks, looked up only in modules that are imported already.

An object can only be an instance of a class whose module is loaded, so a host can recognise a framework's objects
(DeepSpeed engines, FSDP modules, TRL callbacks, transformers Trainers, ...) without importing the framework: this
keeps ``import ssah_plugin`` light and never pulls in a framework the user does not run. Used at set-up only.
"""
from __future__ import annotations

import sys

__all__ = ["loaded_class"]


def loaded_class(module: str, name: str) -> type | None:
    """``module.name`` if ``module`` is imported already and ``name`` is a class there, else ``None``."""
    cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) else None
