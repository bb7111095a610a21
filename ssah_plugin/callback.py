"""``SSAHCallback``: the one added line for transformers ``Trainer`` and every TRL trainer.

    trainer = SFTTrainer(..., callbacks=[SSAHCallback("mask.safetensors")])

When each hook runs (transformers' training loop, without DeepSpeed):

* ``__init__``: reads and checks the mask file (format, version, corruption); nothing model-specific yet.
* ``on_init_end`` (end of ``Trainer.__init__``, callbacks passed to the constructor only): validates the mask against
  the model, so a wrong mask fails before any data loading.
* ``on_train_begin`` (after ``accelerator.prepare``, PEFT wrapping and checkpoint loading; before the first
  forward): validates again against the final parameters, snapshots the frozen slices, registers gradient hooks.
  Under DeepSpeed it also wraps the ZeRO optimizer's ``step`` (which runs inside ``backward`` there).
* during ``backward()``: gradient hooks zero the frozen slices, so grad-norm clipping (which runs next) ignores them.
* ``on_optimizer_step`` (right after ``optimizer.step()``, before the scheduler and ``zero_grad()``): writes the
  snapshot back into the frozen slices, bitwise.
* ``on_log``: adds ``ssah/frozen_fraction`` and ``ssah/frozen_units`` to the first log record, so they reach
  TensorBoard / W&B / MLflow.
* ``on_train_end``: checks that every frozen value equals its snapshot, logs a summary, removes the hooks.
"""
from __future__ import annotations

import gc
import logging
import warnings

from transformers import TrainerCallback

from .enforce import MaskLike, build_enforcer, load_mask
from .mask import Mask

__all__ = ["SSAHCallback"]

logger = logging.getLogger(__name__)


class SSAHCallback(TrainerCallback):
    """Keep the mask's frozen units bit-exact during ``Trainer.train()``.

    Args:
        mask: path to a mask file (``ssah-plugin locate``) or a :class:`~ssah_plugin.Mask`.
        policy: which units to freeze (see :mod:`ssah_plugin.policies`); default: the mask's default policy.
        check_fingerprint: refuse a model whose weights are not those the mask was made from.
        grad_mode: gradient masking mode (:class:`~ssah_plugin.freeze.FreezeEngine`); ``"auto"`` picks per host.

    Example:
        >>> from ssah_plugin import SSAHCallback
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds,          # doctest: +SKIP
        ...                      callbacks=[SSAHCallback("mask.safetensors", policy="scu+cu6")])
    """

    def __init__(self, mask: MaskLike, policy: str | None = None, *, check_fingerprint: bool = True,
                 grad_mode: str = "auto"):
        self.mask: Mask = load_mask(mask)
        self.policy = policy or self.mask.default_policy
        self.mask.frozen(self.policy)  # unknown policy -> error now, not at train time
        self.check_fingerprint = check_fingerprint
        self.grad_mode = grad_mode
        self.enforcer = None
        self._logged = False
        self._steps = 0
        self.summary: dict = {}

    # ------------------------------------------------------------------ set-up
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            from ._peft import check_peft_setup

            check_peft_setup(model)  # TRL wraps with peft_config before this hook: refuse DoRA etc. here
            self.mask.validate(model, check_fingerprint=self.check_fingerprint and not _is_zero3(model))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("SSAHCallback needs the model in on_train_begin; use it with transformers.Trainer")
        if self.enforcer is not None:  # a second train() call on the same trainer
            self.enforcer.detach()
        # After resume_from_checkpoint the weights are the checkpoint's (fine-tuned outside the frozen units): the
        # fingerprint was checked against the base model in on_init_end; here only the structure is checked.
        resumed = state.global_step > 0
        self.mask, self.enforcer = build_enforcer(
            self.mask, model, self.policy, optimizer=optimizer,
            check_fingerprint=self.check_fingerprint and not resumed, grad_mode=self.grad_mode,
        )
        self.enforcer.attach()
        self._move_to_front()
        self._steps = 0
        self.summary = {
            "policy": self.policy,
            "frozen_units": self.mask.summary(self.policy)["frozen_units"],
            "units": self.mask.n_units,
            "frozen_fraction": self.mask.frozen_fraction(self.policy),
            "frozen_elements": self.enforcer.frozen_elements,
        }
        if state.is_world_process_zero:
            logger.info("ssah-plugin: freezing %d of %d units (%.2f%%, policy %s), %d weight elements",
                        self.summary["frozen_units"], self.summary["units"], 100 * self.summary["frozen_fraction"],
                        self.policy, self.summary["frozen_elements"])

    def _move_to_front(self) -> None:
        """Run before the reporting callbacks so that our first ``on_log`` additions reach them.

        The Trainer's ``CallbackHandler`` keeps callbacks in a list; we only reorder that list (found as the list
        that holds this callback and the Trainer's ``DefaultFlowCallback``, so a user's own list is left alone),
        nothing global. If it cannot be found, the summary still reaches ``trainer_state.json`` and the logs.
        """
        from transformers.trainer_callback import DefaultFlowCallback

        for ref in gc.get_referrers(self):
            if (isinstance(ref, list) and ref and ref[0] is not self
                    and all(isinstance(c, TrainerCallback) for c in ref)
                    and any(isinstance(c, DefaultFlowCallback) for c in ref)):
                ref.remove(self)
                ref.insert(0, self)

    # ------------------------------------------------------------------ every step
    def on_optimizer_step(self, args, state, control, **kwargs):
        self.enforcer.after_step()
        self._steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._logged and logs is not None and self.summary:
            added = {"ssah/frozen_fraction": round(self.summary["frozen_fraction"], 6),
                     "ssah/frozen_units": self.summary["frozen_units"]}
            logs.update(added)  # the dict the reporting callbacks (TensorBoard, W&B, ...) receive next
            if state.log_history:  # the Trainer appended its copy before on_log: keep trainer_state.json in step
                state.log_history[-1].update(added)
            self._logged = True

    # ------------------------------------------------------------------ end
    def on_train_end(self, args, state, control, **kwargs):
        if self.enforcer is None:
            return
        drift = self.enforcer.max_drift()
        self.summary.update(steps=self._steps, max_drift=drift)
        self.enforcer.detach()
        if drift != 0.0:
            warnings.warn(
                f"ssah-plugin: frozen units drifted by up to {drift:.3e}: something changed the weights outside the "
                "optimizer step (a custom training loop step, or a second optimizer?). Wrap that optimizer with "
                "ssah_plugin.SSAHOptimizer.", RuntimeWarning, stacklevel=2)
        if state.is_world_process_zero:
            logger.info("ssah-plugin: %d optimizer steps, %d units frozen (%.2f%%), max drift of frozen values %.3g",
                        self._steps, self.summary["frozen_units"], 100 * self.summary["frozen_fraction"], drift)


def _is_zero3(model) -> bool:
    return any(hasattr(p, "ds_tensor") for p in model.parameters())
