"""``TokenwiseConstraint``: the token-wise constrained objective of Qi et al. 2024 (Eq. 3) in the user's own Trainer.

The loss (:mod:`ssah_plugin.recipes.tokenwise`) compares each response token's log-probability under the model being
trained with its log-probability under a frozen copy of the aligned model. One added line attaches it::

    constraint = TokenwiseConstraint(model)                # frozen copy of the aligned model, made now
    trainer = constraint.attach(SFTTrainer(model=model, args=args, train_dataset=ds,
                                           callbacks=[SSAHCallback("mask.safetensors")]))

``attach`` is the one link between the two objects: the constraint needs the trainer (to become its loss and to log
before the reporting integrations) and no Trainer event hands a callback its trainer, so the trainer is given to it,
as TRL's own trainer-aware callbacks take theirs. When each piece runs (transformers' training loop):

* ``__init__``: copies the aligned model (``copy=True``), freezes the copy (``requires_grad=False``, eval mode).
* ``attach(trainer)`` (after the trainer is built, before ``train()``): checks the set-up (no label smoothing, no
  other loss type, no sequence-crossing packing, no ZeRO-3), sets ``trainer.compute_loss_func`` to this object,
  puts it first in the trainer's callback list (so ``on_log`` runs before TensorBoard / W&B / ...), and registers
  forward hooks on the training model.
* ``on_train_begin`` (after ``accelerator.prepare``): checks again against the final model (DeepSpeed engine, PEFT
  wrapper), moves the reference to the model's device and dtype, re-registers the hooks if the model object changed.
* every forward of the training model: a pre-hook records the call's inputs (``input_ids``, ``attention_mask``,
  ``position_ids``, ...) and, from a pre-hook on the input embeddings, the autocast state the forward runs under.
* ``compute_loss_func`` (right after that forward, before ``backward``): runs the reference model without gradient
  on the same inputs under the same autocast state, and returns the constrained loss.
* during ``backward``: a hook on the training forward's logits refuses a loss that did not come from this object
  (a trainer that ignores ``compute_loss_func``), before any parameter gradient exists, so before any step.
* ``on_pre_optimizer_step`` (before ``optimizer.step()``): the same refusal for models that return no logits.
* ``on_log``: adds ``tokenwise/logratio_prefix`` and ``tokenwise/logratio_rest`` (mean ``Delta_t`` over the first
  ``len(betas)`` response tokens and over the others since the last log), a forward-only drift signal.

Cost: one more model in memory (the reference; pass ``copy=False`` with a model you already hold to avoid a second
copy of the same weights) and one forward without gradient per micro-batch (about a third of a training step).
"""
from __future__ import annotations

import copy as _copy
import logging
import math
import weakref
from collections.abc import Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.hosts.callback import put_first
from ssah_plugin.io.models import model_device
from ssah_plugin.recipes.constrained_setup import (
    check_setup,
    dtype_of,
    place_reference,
    refuse_encoder_decoder,
    refuse_zero3,
)
from ssah_plugin.recipes.forward_record import ForwardRecorder, logits_of
from ssah_plugin.recipes.tokenwise import (
    PAPER_BETA_REST,
    PAPER_BETAS,
    beta_schedule,
    response_positions,
    target_logps,
    tokenwise_loss,
)

__all__ = ["TokenwiseConstraint", "response_positions", "beta_schedule", "tokenwise_loss", "PAPER_BETAS",
           "PAPER_BETA_REST"]

logger = logging.getLogger(__name__)

# Forward kwargs that are about the training model's own loss or outputs, not about the inputs.
_NOT_INPUTS = frozenset({"labels", "shift_labels", "num_items_in_batch", "fused_lm_head", "use_cache",
                         "output_router_logits", "output_attentions", "output_hidden_states", "return_dict",
                         "logits_to_keep", "return_loss"})
_USAGE = "constraint.attach(trainer) (it sets compute_loss_func and registers the hooks)"
_NOT_ITS_LOSS = ("a training forward's loss did not come from TokenwiseConstraint: the trainer computes its own loss "
                 "(it ignores compute_loss_func, e.g. DPOTrainer, or uses a fused loss head). Fix: use "
                 "TokenwiseConstraint with transformers.Trainer or TRL SFTTrainer, attached with " + _USAGE + ".")


class TokenwiseConstraint(TrainerCallback):
    """The token-wise constrained loss against the aligned model, attached to a Trainer with :meth:`attach`.

    Args:
        aligned_model: the model as it is before fine-tuning (the one you are about to train). With ``copy=True``
            (default) a frozen deep copy is made now, so later training cannot touch it. With ``copy=False`` this
            model itself is used as the frozen reference: pass a second, separately loaded copy of the aligned
            weights (it must share no parameter with the model being trained).
        betas: ``beta_t`` for the first ``len(betas)`` response tokens (paper: ``0.5, 2, 2, 2, 2``).
        beta_rest: ``beta_t`` for every later response token (paper: ``0.1``).
        copy: see ``aligned_model``.

    Refused at set-up (:class:`~ssah_plugin.errors.UnsupportedSetupError`, with the fix in the message): DeepSpeed
    ZeRO-3 (the reference would need its own sharding); packing other than padding-free BFD (TRL
    ``packing_strategy="wrapped"`` / ``"bfd_split"`` cut sequences, so response positions are lost); label smoothing;
    a trainer with another ``compute_loss_func`` or ``loss_type``; an encoder-decoder model; a reference that shares
    parameters with the trained model; a ``train()`` without :meth:`attach`.

    Example:
        >>> from ssah_plugin import SSAHCallback, TokenwiseConstraint
        >>> constraint = TokenwiseConstraint(model)                                  # doctest: +SKIP
        >>> trainer = constraint.attach(SFTTrainer(model=model, args=args, train_dataset=ds,  # doctest: +SKIP
        ...                                        callbacks=[SSAHCallback("mask.safetensors")]))
    """

    def __init__(self, aligned_model: nn.Module, *, betas: Sequence[float] = PAPER_BETAS,
                 beta_rest: float = PAPER_BETA_REST, copy: bool = True):
        if not isinstance(aligned_model, nn.Module):
            raise TypeError(f"aligned_model must be a torch.nn.Module (the model before fine-tuning), "
                            f"got {type(aligned_model).__name__}")
        self.betas = tuple(float(b) for b in betas)
        self.beta_rest = float(beta_rest)
        for b in (*self.betas, self.beta_rest):
            if not (math.isfinite(b) and b > 0):
                raise ValueError(f"every beta must be a finite number > 0, got {b!r} "
                                 f"(betas={tuple(betas)!r}, beta_rest={beta_rest!r})")
        refuse_encoder_decoder(aligned_model)
        refuse_zero3(aligned_model, where="the aligned model")
        reference = _copy.deepcopy(aligned_model) if copy else aligned_model
        reference.requires_grad_(False)
        reference.eval()
        self.reference: nn.Module = reference
        self.copied = copy
        self._trainer: weakref.ref | None = None  # set by attach()
        self._recorder = ForwardRecorder(_NOT_ITS_LOSS)  # hooks on the training model (set by attach)
        self._placed = False
        self.calls = 0  # compute_loss_func calls (train and eval)
        self._stats = torch.zeros(4, dtype=torch.float64)  # sum/count of Delta on prefix, sum/count on the rest

    # ------------------------------------------------------------------ the link to the trainer
    def attach(self, trainer):
        """Make this object ``trainer``'s loss and first callback, check the set-up now, and return ``trainer``.

        Call once, after building the trainer and before ``train()`` / ``evaluate()``. Sets
        ``trainer.compute_loss_func`` (refused if the trainer already has another one), puts this callback at the
        front of the trainer's callbacks with ``Trainer.pop_callback`` / ``add_callback`` (its ``on_log`` additions
        then reach the reporting integrations; with ``SSAHCallback.add_to(trainer)`` too, the one called last runs
        first, both ahead of the others), and registers the forward hooks on ``trainer.model``.
        """
        from transformers import Trainer

        if not isinstance(trainer, Trainer):
            raise TypeError(f"attach() takes a transformers.Trainer (or a TRL trainer), got {type(trainer).__name__}")
        if self.trainer is not None and self.trainer is not trainer:
            raise UnsupportedSetupError("this TokenwiseConstraint is attached to another trainer already. Fix: make "
                                        "one TokenwiseConstraint per trainer.")
        current = getattr(trainer, "compute_loss_func", None)
        if current is not None and current is not self:
            raise UnsupportedSetupError(
                f"{type(trainer).__name__} already has a compute_loss_func ({current!r}); the token-wise constraint "
                "is the loss. Fix: build the trainer without compute_loss_func, then constraint.attach(trainer).")
        check_setup(trainer.args, trainer.model, self.reference, padding_free=getattr(trainer, "padding_free", None))
        trainer.compute_loss_func = self
        put_first(trainer, self)  # its log entries reach the reporting integrations
        self._trainer = weakref.ref(trainer)
        self._attach(trainer.model)
        return trainer

    @property
    def trainer(self):
        """The trainer this constraint is attached to (``None`` before :meth:`attach`)."""
        return self._trainer() if self._trainer is not None else None

    # ------------------------------------------------------------------ the loss (compute_loss_func)
    def __call__(self, outputs, labels: torch.Tensor | None, num_items_in_batch=None) -> torch.Tensor:
        """``compute_loss_func(outputs, labels, num_items_in_batch)``; runs after the training model's forward,
        before ``backward``."""
        captured = self._recorder.take()
        if captured is None:
            raise UnsupportedSetupError(
                "TokenwiseConstraint was called as compute_loss_func, but no forward of the training model was "
                f"recorded: its hooks are not installed. Fix: {_USAGE}, instead of compute_loss_func=constraint.")
        logits = logits_of(outputs)
        if logits is None:
            raise UnsupportedSetupError(
                "the training model returned no logits (a fused cross-entropy head, e.g. Liger's "
                "fused_linear_cross_entropy, or logits_to_keep). Fix: turn the fused loss kernel off.")
        kwargs = captured["kwargs"]
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is not None:  # padding-free collators give targets already aligned with the logits
            targets, n_pred = shift_labels, logits.shape[1]
        else:
            if labels is None:
                raise UnsupportedSetupError(
                    "TokenwiseConstraint needs labels (IGNORE -100 on prompt and padding) in every batch. Fix: use a "
                    "collator that returns 'labels' (TRL SFTTrainer, DataCollatorForLanguageModeling, ...).")
            targets, n_pred = labels[..., 1:], logits.shape[1] - 1
        if targets.shape[-1] != n_pred or targets.shape[0] != logits.shape[0]:
            raise UnsupportedSetupError(
                f"labels of shape {tuple(labels.shape) if labels is not None else None} do not match logits of shape "
                f"{tuple(logits.shape)}: the recorded forward is not the one whose outputs reached the loss. "
                "Fix: use TokenwiseConstraint with transformers.Trainer or TRL SFTTrainer, which call the loss "
                "right after the forward.")
        targets = targets.to(logits.device)
        pos_ids = kwargs.get("position_ids")
        if pos_ids is not None and pos_ids.dim() == 2 and pos_ids.shape == logits.shape[:2]:
            seq_pos = pos_ids[:, 1:] if shift_labels is None else torch.cat(
                [pos_ids[:, 1:], torch.ones_like(pos_ids[:, :1])], dim=1)
            seq_pos = seq_pos.to(logits.device)
        else:
            seq_pos = None
        positions = response_positions(targets, seq_pos)
        keep = positions.ge(0)
        pred_logits = logits if shift_labels is not None else logits[:, :-1]

        if not self._placed and self._recorder.model is not None:  # e.g. trainer.evaluate() before any train()
            self._place_reference(self._recorder.model)
        ref_logits = self._reference_logits(captured)
        ref_pred = ref_logits if shift_labels is not None else ref_logits[:, :-1]
        safe_targets = targets.clamp(min=0)
        policy_lp = target_logps(pred_logits, safe_targets, keep)
        with torch.no_grad():
            ref_lp = target_logps(ref_pred.to(logits.device), safe_targets, keep)
        betas = beta_schedule(positions[keep], self.betas, self.beta_rest)
        per_token = tokenwise_loss(policy_lp, ref_lp, betas)
        if num_items_in_batch is None:
            denom = keep.sum().clamp(min=1).to(per_token.dtype)  # no host sync
        else:
            denom = torch.as_tensor(num_items_in_batch, device=per_token.device).to(per_token.dtype)
        self.calls += 1
        with torch.no_grad():
            delta = (policy_lp - ref_lp).double()
            pre = positions[keep] < len(self.betas)
            if self._stats.device != delta.device:  # stays on the device: no host sync per step
                self._stats = self._stats.to(delta.device)
            self._stats += torch.stack([delta[pre].sum(), pre.sum().double(), delta[~pre].sum(),
                                        (~pre).sum().double()])
        return per_token.sum() / denom

    def _reference_logits(self, captured: dict) -> torch.Tensor:
        kwargs = {k: v for k, v in captured["kwargs"].items() if k not in _NOT_INPUTS}
        kwargs["use_cache"] = False
        if "input_ids" not in kwargs and not captured["args"]:
            raise UnsupportedSetupError(
                "the training model was called without input_ids (inputs_embeds?): the reference model cannot be "
                "fed the same inputs. Fix: feed input_ids.")
        ac = captured.get("autocast")
        with torch.no_grad():
            if ac is not None and ac[1]:
                with torch.autocast(device_type=ac[0], dtype=ac[2], enabled=True):
                    out = self.reference(*captured["args"], **kwargs)
            else:
                out = self.reference(*captured["args"], **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    # ------------------------------------------------------------------ hooks on the training model
    def _attach(self, model: nn.Module) -> None:
        self._recorder.attach(model)

    def close(self) -> None:
        """Remove the hooks from the training model (the trainer can then no longer use this loss)."""
        self._recorder.detach()

    def _place_reference(self, model: nn.Module) -> None:
        place_reference(self.reference, model)
        self._placed = True

    # ------------------------------------------------------------------ callback events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.trainer is None or getattr(self.trainer, "compute_loss_func", None) is not self:
            raise UnsupportedSetupError(f"TokenwiseConstraint is not this trainer's loss. Fix: {_USAGE}, after "
                                        "building the trainer and without passing compute_loss_func / callbacks.")
        if model is None:
            raise UnsupportedSetupError("TokenwiseConstraint needs the model in on_train_begin; use it with "
                                        "transformers.Trainer or a TRL trainer.")
        check_setup(args, model, self.reference, padding_free=getattr(self.trainer, "padding_free", None))
        self._place_reference(model)
        self._attach(model)
        self._recorder.reset()  # nothing left over from an interrupted run
        self._stats.zero_()
        if state.is_world_process_zero:
            logger.info("ssah-plugin: token-wise constraint on, betas %s then %g, reference %s (%s, %s)",
                        self.betas, self.beta_rest, "copy" if self.copied else "given model",
                        model_device(self.reference), dtype_of(self.reference))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._recorder.pending_grad:  # a training forward whose loss never reached __call__ (no logits)
            raise UnsupportedSetupError(_NOT_ITS_LOSS)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not bool(self._stats[[1, 3]].sum()):
            return
        s = self._stats.tolist()
        added = {}
        if s[1]:
            added["tokenwise/logratio_prefix"] = round(s[0] / s[1], 6)
        if s[3]:
            added["tokenwise/logratio_rest"] = round(s[2] / s[3], 6)
        logs.update(added)  # the dict the reporting callbacks (after this one, see attach) receive next
        if state.log_history and state.log_history[-1] is not logs:
            state.log_history[-1].update(added)
        self._stats.zero_()
