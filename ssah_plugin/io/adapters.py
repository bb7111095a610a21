"""PEFT adapters on disk: recognise an adapter folder, and merge it into its base (what users deploy).

Used by ``ssah-plugin verify --base BASE --tuned ADAPTER_DIR`` (:func:`ssah_plugin.io.checkpoint.open_checkpoint`)
and by model loading of adapter folders (:func:`ssah_plugin.io.models.load_model`). ``peft`` and ``transformers``
are imported only when an adapter is merged.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ssah_plugin.core.peft_layout import is_tuner_layer
from ssah_plugin.core.peft_rules import check_lora_configs, check_lora_layer
from ssah_plugin.errors import UnsupportedSetupError, require

__all__ = ["ADAPTER_CONFIG", "is_adapter_dir", "merge_adapter_state"]

logger = logging.getLogger(__name__)

#: the file that marks a PEFT adapter folder
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a PEFT adapter directory (``adapter_config.json`` present)."""
    return Path(path, ADAPTER_CONFIG).is_file()


def merge_adapter_state(base: str | os.PathLike | nn.Module, adapter_dir: str | os.PathLike, *,
                        dtype: torch.dtype | str = "auto") -> nn.Module:
    """Load ``adapter_dir`` onto ``base`` (a model directory or a loaded model) and return the merged model.

    The adapter's configuration is checked first (:func:`ssah_plugin.core.peft_rules.check_lora_configs`: a DoRA
    or PiSSA adapter is refused, since its merge is not ``W + s · B @ A``), and every loaded LoRA layer is checked
    before merging. The merge is PEFT's ``merge_and_unload``, so what is verified is exactly what users deploy.
    ``dtype="auto"`` loads the base in its checkpoint dtype, so the merge happens in the precision users deploy.
    When ``base`` is a model object it is modified in place (PEFT injects into it).

    Raises:
        UnsupportedSetupError: ``adapter_dir`` is not an adapter folder, or the adapter is not plain LoRA.
        MissingExtraError: ``peft`` is not installed.
    """
    peft = require("peft", "peft", "verifying a LoRA adapter")
    if not is_adapter_dir(adapter_dir):
        raise UnsupportedSetupError(f"{adapter_dir} is not a PEFT adapter directory (no {ADAPTER_CONFIG}); pass "
                                    "the directory written by model.save_pretrained() / trainer.save_model()")
    cfg = peft.PeftConfig.from_pretrained(str(adapter_dir))
    check_lora_configs({"default": cfg})
    if isinstance(base, nn.Module):
        model = base
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    wrapped = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    check_lora_configs(wrapped.peft_config)
    for name, mod in wrapped.base_model.model.named_modules():
        if is_tuner_layer(mod):
            check_lora_layer(mod, name)
    logger.info("merging adapter %s into its base", adapter_dir)
    return wrapped.merge_and_unload()
