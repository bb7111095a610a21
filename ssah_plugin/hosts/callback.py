"""``SSAHCallback``: the one added line for transformers ``Trainer`` and every TRL trainer.

    trainer = SFTTrainer(..., callbacks=[SSAHCallback("mask.safetensors")])
    # or, to run ahead of the Trainer's own callbacks (reporting integrations, TRL's BEMACallback):
    SSAHCallback("mask.safetensors").add_to(trainer)

When each hook runs (transformers' training loop, without DeepSpeed):

* ``__init__``: reads and checks the mask file (format, version, corruption); nothing model-specific yet.
* :meth:`SSAHCallback.add_to` (optional, after the trainer is built): validates the mask against the model and puts
  the callback first in the trainer's list, with transformers' own ``add_callback`` / ``pop_callback``.
* ``on_init_end`` (end of ``Trainer.__init__``, callbacks passed to the constructor only): validates the mask against
  the model, so a wrong mask fails before any data loading. A model already partitioned by ZeRO-3 (built under
  ``TrainingArguments(deepspeed=...)``) is fingerprinted from each rank's own partition, with one small collective
  (:mod:`ssah_plugin.hosts.zero3_read`).
* ``on_train_begin`` (after ``accelerator.prepare``, PEFT wrapping and checkpoint loading; before the first
  forward; at every ``train()`` call, also after ``add_callback`` and on resume): validates again against the final
  parameters, checks that the values about to be frozen are exactly the mask's base values (digests, mask format
  v2), compares a resumed checkpoint's saved plugin state (frozen set, policy) with this run's
  (:mod:`ssah_plugin.hosts.callback_state`), snapshots the frozen slices, registers gradient hooks. Under DeepSpeed
  the restore is attached to the ZeRO optimizer's step instead (which runs inside ``backward`` there).
* checkpoint saves: :meth:`SSAHCallback.state` (transformers' ``ExportableState``) writes the plugin's state into
  ``trainer_state.json`` (``stateful_callbacks.SSAHCallback``): policy, frozen-set digest, digest of the frozen
  values, mask checksum. A resume reads it back from the checkpoint's ``TrainerState``.
* during ``backward()``: gradient hooks zero the frozen slices, so grad-norm clipping (which runs next) ignores them.
* ``on_optimizer_step`` (right after ``optimizer.step()``, before the scheduler and ``zero_grad()``): writes the
  snapshot back into the frozen slices, bitwise. transformers calls every callback's ``on_optimizer_step`` before
  any ``on_step_end``, ``on_log``, ``on_save`` or ``on_evaluate``, so from ``on_step_end`` on every callback sees the
  exact values wherever this callback sits in the list.
* ``on_log`` (first call): adds ``ssah/frozen_fraction`` and ``ssah/frozen_units`` to the log record; the callbacks
  after this one (and ``trainer_state.json``) receive them.
* ``on_train_end``: checks that every frozen value equals its snapshot, writes the frozen values into TRL
  ``BEMACallback`` copies (before they save, when this callback runs first), logs a summary, removes the hooks.

**Position in the callback list.** ``Trainer(callbacks=[...])`` appends the given callbacks after transformers' own
(``DefaultFlowCallback``, the ``report_to`` integrations), and a callback is never given the trainer, so it cannot
move itself. The weights do not depend on the position (see ``on_optimizer_step``). Two things do:
the reporting integrations log ``on_log`` records as they receive them, and ``BEMACallback`` saves its copy in its
own ``on_train_end``. :meth:`SSAHCallback.add_to` puts the callback first so that both see the final values.
"""
from __future__ import annotations

import logging
import warnings
import weakref

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ssah_plugin.core.engine import FreezeEngine, SnapshotDevice, check_snapshot_device
from ssah_plugin.core.mask import Mask
from ssah_plugin.hosts.callback_state import (
    check_resume,
    check_resumed_values,
    plugin_record,
    saved_record,
)
from ssah_plugin.hosts.enforce import build_enforcer
from ssah_plugin.hosts.loaded import loaded_class
from ssah_plugin.hosts.peft import check_peft_setup
from ssah_plugin.hosts.setup import MaskLike, load_mask
from ssah_plugin.hosts.zero3_read import validate_mask

__all__ = ["SSAHCallback", "put_first"]

logger = logging.getLogger(__name__)


def put_first(trainer, callback) -> None:
    """Make ``callback`` the first of ``trainer``'s callbacks (adding it if absent), the others kept in their order.

    Uses transformers' public ``Trainer.pop_callback`` / ``add_callback``: every other callback is taken out and added
    back after ``callback``, so it runs first at every event.
    """
    if not any(c is callback for c in trainer.callback_handler.callbacks):
        trainer.add_callback(callback)
    others = [c for c in trainer.callback_handler.callbacks if c is not callback]
    for cb in others:
        trainer.pop_callback(cb)
    for cb in others:
        trainer.add_callback(cb)


class SSAHCallback(TrainerCallback, ExportableState):
    """Keep the mask's frozen units bit-exact during ``Trainer.train()``.

    Args:
        mask: a mask file (``ssah-plugin locate``), a folder or Hub repo spec (``"org/name[@revision][:policy]"``,
            docs/hub.md) or a :class:`~ssah_plugin.Mask`.
        policy: which units to freeze (see :mod:`ssah_plugin.core.policies`); default: the mask's default policy.
        check_fingerprint: refuse a model whose weights are not those the mask was made from.
        grad_mode: gradient masking mode (:class:`~ssah_plugin.core.engine.FreezeEngine`); ``"auto"`` picks per host.
        snapshot_device: where the frozen values' snapshot lives: ``"param"`` (default, next to each parameter) or
            ``"cpu"`` (host memory, pinned on CUDA machines; frees GPU memory when most weights are frozen).

    Example:
        >>> from ssah_plugin import SSAHCallback
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds,          # doctest: +SKIP
        ...                      callbacks=[SSAHCallback("mask.safetensors", policy="ru-only")])
    """

    def __init__(self, mask: MaskLike | None = None, policy: str | None = None, *, check_fingerprint: bool = True,
                 grad_mode: str = "auto", snapshot_device: SnapshotDevice = "param"):
        if mask is None:
            raise TypeError(
                "SSAHCallback needs a mask (path or ssah_plugin.Mask). If this comes from "
                "restore_callback_states_from_checkpoint=True: the callback was given a Mask object, which a "
                "checkpoint cannot store; pass the mask as a file path, or leave that option off (the plugin reads "
                "its saved state from the checkpoint either way)")
        self._mask_source = str(mask) if not isinstance(mask, Mask) else None
        self.mask: Mask = load_mask(mask, policy)
        self.policy = policy or self.mask.default_policy
        self.mask.frozen(self.policy)  # unknown policy -> error now, not at train time
        self.check_fingerprint = check_fingerprint
        self.grad_mode = grad_mode
        self.snapshot_device = check_snapshot_device(snapshot_device)
        self.enforcer = None
        self._trainer: weakref.ref | None = None  # set by add_to
        self._logged = False
        self._steps = 0
        self.summary: dict = {}
        self.record: dict = self._record()

    # ------------------------------------------------------------------ saved with checkpoints
    def _record(self, values_digest: str | None = None) -> dict:
        return plugin_record(self.mask, self.policy, values_digest)

    def state(self) -> dict:
        """What each checkpoint records about the plugin (``trainer_state.json``), read back on resume."""
        return {"args": {"mask": self._mask_source, "policy": self.policy, "check_fingerprint": self.check_fingerprint,
                         "grad_mode": self.grad_mode, "snapshot_device": self.snapshot_device},
                "attributes": {"record": dict(self.record)}}

    # ------------------------------------------------------------------ set-up
    def add_to(self, trainer) -> SSAHCallback:
        """Add this callback to ``trainer`` ahead of every other callback; returns ``self``.

        Call it once the trainer is built (and before ``train()``). It validates the mask against the model now, as
        ``on_init_end`` does for constructor callbacks, then reorders the trainer's list with transformers' public
        ``Trainer.pop_callback`` / ``add_callback``: every other callback is taken out and added back in its order,
        after this one. The callback then runs first at every event: its ``on_log`` additions reach the reporting
        integrations (TensorBoard, W&B, MLflow, ...), and at ``on_train_end`` it writes the frozen values into TRL
        ``BEMACallback`` copies before they are saved. A callback added to the trainer later runs after it.
        """
        self.on_init_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
        put_first(trainer, self)
        self._trainer = weakref.ref(trainer)
        return self

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """End of ``Trainer.__init__`` (constructor callbacks only): validate the mask against the model."""
        if model is not None:
            check_peft_setup(model)  # TRL wraps with peft_config before this hook: refuse DoRA etc. here
            validate_mask(self.mask, model, check_fingerprint=self.check_fingerprint)  # ZeRO-3: a collective

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Start of ``train()``, before the first forward: check everything, snapshot, register gradient hooks."""
        if model is None:
            raise RuntimeError("SSAHCallback needs the model in on_train_begin; use it with transformers.Trainer")
        if self.enforcer is not None:  # a second train() call on the same trainer
            self.enforcer.detach()
        # After resume_from_checkpoint the weights are the checkpoint's (fine-tuned outside the frozen units): the
        # fingerprint (a sample of whole tensors) is not compared then, but the frozen values are, exactly.
        resumed = state.global_step > 0
        saved = saved_record(state, type(self).__name__) if resumed else None
        if resumed:  # before anything is planned: the same frozen set as the checkpoint's run?
            # (the record is computed afresh: restore_callback_states_from_checkpoint may have set self.record)
            check_resume(saved, self._record(), state.global_step)
        self.mask, self.enforcer = build_enforcer(
            self.mask, model, self.policy, optimizer=optimizer,
            check_fingerprint=self.check_fingerprint and not resumed, check_values=self.check_fingerprint,
            grad_mode=self.grad_mode, snapshot_device=self.snapshot_device,
        )
        report = self.enforcer.base_check
        if resumed:
            check_resumed_values(saved, report, self.check_fingerprint)
        self.record = self._record(report.values_digest if report is not None else None)
        self.record["base_checked"] = bool(report is not None and report.complete and self.check_fingerprint)
        if isinstance(getattr(state, "stateful_callbacks", None), dict):
            # a checkpoint written without the plugin has no entry, and the Trainer's save would fail on it
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        self.enforcer.attach()
        self._steps = 0
        if self._trainer is None and state.is_world_process_zero and getattr(args, "report_to", None):
            logger.info("ssah-plugin: the reporting integrations (%s) run before callbacks passed to Trainer(...) "
                        "and will not receive ssah/frozen_* (trainer_state.json does); SSAHCallback(...)"
                        ".add_to(trainer) runs the plugin first", ", ".join(map(str, args.report_to)))
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

    # ------------------------------------------------------------------ TRL's BEMACallback
    def _bema_callbacks(self) -> list:
        """TRL ``BEMACallback`` instances in the trainer given to :meth:`add_to` (none without it)."""
        trainer = self._trainer() if self._trainer is not None else None
        bema_cls = loaded_class("trl.trainer.callbacks", "BEMACallback")  # none can exist before TRL defines it
        if trainer is None or bema_cls is None:
            return []
        return [c for c in trainer.callback_handler.callbacks if isinstance(c, bema_cls)]

    def _restore_bema(self) -> None:
        """Write the frozen values into each BEMA copy (EMA buffers, running model) before BEMA saves it.

        BEMA updates ``ema = (1 - b) * ema + b * theta`` at every ``on_step_end``, which rounds a frozen value again
        each time (drift ~1e-8), and saves its running model to ``output_dir/bema`` in its ``on_train_end``; this
        runs in this callback's ``on_train_end``, which comes first after :meth:`add_to`.
        """
        bemas = self._bema_callbacks()
        if not bemas:
            return
        if not isinstance(self.enforcer, FreezeEngine):
            warnings.warn("ssah-plugin: TRL's BEMACallback under DeepSpeed: its EMA copy (output_dir/bema) is not "
                          "kept exact on frozen units; use the trained model, which is", RuntimeWarning, stacklevel=3)
            return
        for bema in bemas:
            run = getattr(bema, "running_model", None)
            run_params = dict(run.named_parameters()) if run is not None else {}
            for name, theta, ema in zip(getattr(bema, "param_names", []), getattr(bema, "thetat_params", []),
                                        getattr(bema, "ema_params", [])):
                for copy in (ema, run_params.get(name)):
                    if isinstance(copy, torch.Tensor):
                        self.enforcer.write_frozen_into(theta, copy)

    # ------------------------------------------------------------------ every step
    def on_optimizer_step(self, args, state, control, **kwargs):
        """Right after ``optimizer.step()``, before the LR scheduler, ``zero_grad()`` and ``on_step_end``: restore."""
        self.enforcer.after_step()
        self._steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        """After the Trainer built a log record (first one only): add the frozen fraction and unit count."""
        if not self._logged and logs is not None and self.summary:
            added = {"ssah/frozen_fraction": round(self.summary["frozen_fraction"], 6),
                     "ssah/frozen_units": self.summary["frozen_units"]}
            logs.update(added)  # the dict the reporting callbacks (TensorBoard, W&B, ...) receive next
            if state.log_history:  # the Trainer appended its copy before on_log: keep trainer_state.json in step
                state.log_history[-1].update(added)
            self._logged = True

    # ------------------------------------------------------------------ end
    def on_train_end(self, args, state, control, **kwargs):
        """End of ``train()``, after the last step: check for drift, fix BEMA copies, remove the hooks."""
        if self.enforcer is None:
            return
        drift = self.enforcer.max_drift()
        self.summary.update(steps=self._steps, max_drift=drift)
        self._restore_bema()
        self.enforcer.detach()
        if drift != 0.0:
            warnings.warn(
                f"ssah-plugin: frozen units drifted by up to {drift:.3e}: something changed the weights outside the "
                "optimizer step (a custom training loop step, or a second optimizer?). Wrap that optimizer with "
                "ssah_plugin.SSAHOptimizer.", RuntimeWarning, stacklevel=2)
        if state.is_world_process_zero:
            logger.info("ssah-plugin: %d optimizer steps, %d units frozen (%.2f%%), max drift of frozen values %.3g",
                        self._steps, self.summary["frozen_units"], 100 * self.summary["frozen_fraction"], drift)

