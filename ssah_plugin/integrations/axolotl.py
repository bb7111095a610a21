"""Axolotl plugin: keep the mask's frozen units bit-exact during ``axolotl train``.

Add to the Axolotl YAML (ready config: ``integrations/axolotl/sft-ssah.yml``)::

    plugins:
      - ssah_plugin.integrations.axolotl.SSAHPlugin
    ssah_mask: mask.safetensors        # from `ssah-plugin locate` (path relative to where axolotl runs)
    ssah_policy: scu+cu6               # optional; default: the mask's own default policy
    ssah_check_fingerprint: true       # optional; false skips the check that the weights are the mask's base model

When each part runs (Axolotl 0.19):

* config load (``axolotl.cli.config.load_cfg``: before datasets, model or trainer are built): Axolotl imports this
  module and merges :class:`SSAHArgs` into its config schema (:meth:`SSAHPlugin.get_input_args`). Validating the
  config reads the mask file and checks the policy, so a missing, corrupt or unknown-policy mask stops the run there.
* trainer build (``HFCausalTrainerBuilder.get_callbacks``, after the model and any LoRA adapter are loaded):
  :meth:`SSAHPlugin.add_callbacks_pre_trainer` returns one :class:`~ssah_plugin.SSAHCallback`, which Axolotl passes
  to the Trainer's constructor. From there the callback's own hooks run: ``on_init_end`` (end of ``Trainer.__init__``)
  refuses a mask made for another model; ``on_train_begin`` checks the base values and attaches gradient masking;
  gradient hooks zero frozen gradients during ``backward()`` (before clipping); ``on_optimizer_step`` (after
  ``optimizer.step()``, before the scheduler and ``zero_grad()``) writes the frozen slices back bitwise.

Only the callback does the work, so every host it supports under ``transformers.Trainer`` (full fine-tuning, LoRA,
DeepSpeed ZeRO) is what this plugin supports; what was tested through Axolotl itself is listed in
``docs/integrations.md``.
"""
from __future__ import annotations

import logging
from typing import Any

from ssah_plugin.errors import MissingExtraError

try:
    from axolotl.integrations.base import BasePlugin
    from pydantic import BaseModel, model_validator
except ImportError as exc:  # Axolotl turns an ImportError into a log line: the message must name the fix
    raise MissingExtraError("axolotl", "axolotl", "ssah_plugin.integrations.axolotl (the Axolotl plugin)") from exc

__all__ = ["SSAHArgs", "SSAHPlugin"]

logger = logging.getLogger(__name__)


class SSAHArgs(BaseModel):
    """The plugin's keys in the Axolotl config; validated with the rest of the config, before any data or model."""

    ssah_mask: str | None = None
    ssah_policy: str | None = None
    ssah_check_fingerprint: bool | None = None

    @model_validator(mode="after")
    def _check_mask(self) -> SSAHArgs:
        if not self.ssah_mask:
            raise ValueError("the ssah_plugin.integrations.axolotl.SSAHPlugin plugin is listed in `plugins:` but "
                             "`ssah_mask:` is not set; give the mask file (`ssah-plugin locate ... -o "
                             "mask.safetensors`) or remove the plugin")
        try:  # reads the file, checks the policy
            _callback(self.ssah_mask, self.ssah_policy, self.ssah_check_fingerprint)
        except ValueError as exc:  # pydantic reports a ValueError as a config error, with its message
            raise ValueError(f"ssah_mask {self.ssah_mask!r} (ssah_policy {self.ssah_policy!r}): {exc}") from exc
        return self


class SSAHPlugin(BasePlugin):
    """Axolotl plugin that adds :class:`~ssah_plugin.SSAHCallback` (built from ``ssah_mask`` / ``ssah_policy``)."""

    def get_input_args(self) -> str:
        return "ssah_plugin.integrations.axolotl.SSAHArgs"

    def add_callbacks_pre_trainer(self, cfg: Any, model: Any) -> list:
        """Called while Axolotl builds the trainer (model and adapters loaded); the callback goes to its constructor."""
        callback = _callback(cfg.ssah_mask, cfg.ssah_policy, cfg.ssah_check_fingerprint)
        logger.info("ssah-plugin: Axolotl plugin adds SSAHCallback(%r, policy=%r)", cfg.ssah_mask, callback.policy)
        return [callback]


def _callback(mask: str | None, policy: str | None, check_fingerprint: bool | None):
    from ssah_plugin import SSAHCallback

    if not mask:
        raise ValueError("ssah_mask is not set in the Axolotl config")
    return SSAHCallback(mask, policy=policy or None,
                        check_fingerprint=True if check_fingerprint is None else bool(check_fingerprint))
