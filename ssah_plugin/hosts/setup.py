"""Set-up steps every host shares, below the hosts themselves: read the mask, check the base values.

This module imports only the core (and :mod:`ssah_plugin.errors`), so every host module (plain PyTorch, DeepSpeed,
the transformers callback) can use it without importing another host. Both steps run once, at set-up, before the
first training step; nothing here runs during ``backward()`` or ``optimizer.step()``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ssah_plugin.core.digest import BaseCheck, check_base_values
from ssah_plugin.core.mask import Mask
from ssah_plugin.core.peft_layout import is_tuner_layer
from ssah_plugin.errors import FrozenValuesError

__all__ = ["Enforcer", "MaskLike", "load_mask", "run_base_check"]

logger = logging.getLogger(__name__)

MaskLike = str | os.PathLike | Mask


class Enforcer(Protocol):
    """What every host engine offers (plain PyTorch: :class:`~ssah_plugin.core.engine.FreezeEngine`)."""

    slices: list

    def attach(self) -> Enforcer: ...
    def after_step(self) -> None: ...
    def detach(self) -> None: ...
    def max_drift(self) -> float: ...
    @property
    def frozen_elements(self) -> int: ...


def load_mask(mask: MaskLike, policy: str | None = None) -> Mask:
    """A :class:`Mask` from a mask spec, a path or an existing object (type errors name what was passed).

    A string is a mask spec (:func:`ssah_plugin.core.hub.parse_mask_spec`): a mask file, a folder written by
    ``save_pretrained``, or a Hub repo ``org/name[@revision]``, each optionally followed by ``:policy``. A policy in
    the spec becomes the returned mask's default policy; ``policy`` is the caller's explicit policy argument, and
    naming another policy there is a :class:`~ssah_plugin.core.hub.MaskSpecError`.
    """
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, (str, os.PathLike)):
        return Mask.from_spec(mask, policy)
    raise TypeError(f"mask must be a mask file, a folder, a Hub repo spec ('org/name:policy') or an ssah_plugin.Mask, "
                    f"got {type(mask).__name__}")


def run_base_check(mask: Mask, model: nn.Module, policy: str | None, *, check_values: bool,
                   get_tensor: Callable[[str, nn.Parameter], torch.Tensor | None] | None = None) -> BaseCheck:
    """:func:`ssah_plugin.core.digest.check_base_values`, raising :class:`FrozenValuesError` when ``check_values``."""
    report = check_base_values(mask, model, policy, get_tensor=get_tensor)
    if check_values and report.mismatched:
        n_bad = sum(m[1] for m in report.mismatched)
        first = report.mismatched[0]
        peft = any(is_tuner_layer(m) for m in model.modules())
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
