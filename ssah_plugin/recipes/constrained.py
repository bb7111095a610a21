"""The token-wise constrained objective of Qi et al. 2024 (Eq. 3), inside the user's own Trainer.

"Safety Alignment Should Be Made More Than Just a Few Tokens Deep" (Qi et al., ICLR 2025) replaces the fine-tuning
cross-entropy by, for every response token ``t`` (``Delta_t = log pi_theta(y_t|x,y<t) - log pi_aligned(y_t|x,y<t)``)::

    loss_t = (2 / beta_t) * softplus(-beta_t * Delta_t)  =  -(2 / beta_t) * log sigmoid(beta_t * Delta_t)

The loss falls as ``log pi_theta`` rises, like cross-entropy (as ``beta_t -> 0`` it tends to ``-log pi_theta`` plus a
constant), but it saturates once ``log pi_theta`` exceeds ``log pi_aligned`` by a few ``1/beta_t``: a large
``beta_t`` caps how far the token's probability may move away from the aligned model. Defaults follow the paper:
``beta = 0.5`` on the first response token, ``2.0`` on tokens 2-5, ``0.1`` after. The per-token losses are summed and
divided by ``num_items_in_batch`` (the Trainer's own cross-entropy normalisation, so gradient accumulation and
token averaging across ranks behave as for the default loss), or by the batch's own token count without it.

One object is both pieces, so it is passed twice::

    constraint = TokenwiseConstraint(model)                # frozen copy of the aligned model, made now
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds,
                         compute_loss_func=constraint,     # the loss
                         callbacks=[constraint])           # the hook that feeds the reference model

When each piece runs (transformers' training loop):

* ``__init__``: copies the aligned model (``copy=True``), freezes the copy (``requires_grad=False``, eval mode).
* ``on_init_end`` (end of ``Trainer.__init__``): checks the trainer (``compute_loss_func`` is this object, no label
  smoothing, no sequence-crossing packing, no ZeRO-3) and registers a forward pre-hook on the training model.
* ``on_train_begin`` (after ``accelerator.prepare``): checks again against the final model (DeepSpeed engine, PEFT
  wrapper), moves the reference to the model's device and dtype, re-registers the hook if the model object changed.
* every forward of the training model: the pre-hook records the call's inputs (``input_ids``, ``attention_mask``,
  ``position_ids``, ...) and, from a pre-hook on the input embeddings, the autocast state the forward runs under.
* ``compute_loss_func`` (right after that forward, before ``backward``): runs the reference model without gradient
  on the same inputs under the same autocast state, and returns the constrained loss.
* ``on_log``: adds ``tokenwise/logratio_prefix`` and ``tokenwise/logratio_rest`` (mean ``Delta_t`` over the first
  ``len(betas)`` response tokens and over the others since the last log), a forward-only drift signal.

Cost: one more model in memory (the reference; pass ``copy=False`` with a model you already hold to avoid a second
copy of the same weights) and one forward without gradient per micro-batch (about a third of a training step).
"""
from __future__ import annotations

import copy as _copy
import logging
import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.io.models import model_device

__all__ = ["TokenwiseConstraint", "response_positions", "beta_schedule", "tokenwise_loss", "PAPER_BETAS",
           "PAPER_BETA_REST"]

logger = logging.getLogger(__name__)

#: Qi et al. 2024, Table 3 / Eq. 3: beta on response tokens 1..5 (then :data:`PAPER_BETA_REST`).
PAPER_BETAS: tuple[float, ...] = (0.5, 2.0, 2.0, 2.0, 2.0)
PAPER_BETA_REST: float = 0.1

IGNORE_INDEX = -100
# Forward kwargs that are about the training model's own loss or outputs, not about the inputs.
_NOT_INPUTS = frozenset({"labels", "shift_labels", "num_items_in_batch", "fused_lm_head", "use_cache",
                         "output_router_logits", "output_attentions", "output_hidden_states", "return_dict",
                         "logits_to_keep", "return_loss"})


# ---------------------------------------------------------------------------------------------- pure functions
def response_positions(targets: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Index of each target token among the response tokens of its sequence; ``-1`` where ignored.

    ``targets`` are the already shifted labels (``targets[:, i]`` is the token predicted from position ``i``);
    ``IGNORE_INDEX`` marks prompt and padding. A row is one sequence, unless ``position_ids`` (aligned with
    ``targets``, i.e. taken at the target's own position) restart at 0 inside it: then each restart begins a new
    sequence (padding-free packing), and counting restarts too.
    """
    valid = targets.ne(IGNORE_INDEX)
    counts = valid.long().cumsum(dim=-1) - valid.long()  # valid targets strictly before each position
    if position_ids is not None:
        start = position_ids.eq(0)
        start[..., 0] = True
        base = torch.where(start, counts, torch.zeros_like(counts)).cummax(dim=-1).values
        counts = counts - base
    return torch.where(valid, counts, torch.full_like(counts, -1))


def beta_schedule(positions: torch.Tensor, betas: Sequence[float] = PAPER_BETAS,
                  beta_rest: float = PAPER_BETA_REST) -> torch.Tensor:
    """``beta_t`` for each response position (``positions >= 0``): ``betas[t]`` for ``t < len(betas)``, else
    ``beta_rest``. Returned in float64 on ``positions.device``; ignored positions get ``beta_rest``."""
    table = torch.tensor(list(betas) + [beta_rest], dtype=torch.float64, device=positions.device)
    idx = positions.clamp(min=0, max=len(betas))
    return table[idx]


def tokenwise_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per token: ``(2/beta) * softplus(-beta * (policy_logps - reference_logps))`` (same shape, float32+)."""
    b = betas.to(policy_logps.dtype)
    delta = policy_logps - reference_logps.detach()
    return (2.0 / b) * F.softplus(-b * delta)


def _target_logps(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` at the kept positions only (never the full ``[B, T, V]`` in float32)."""
    picked = logits[keep].float()
    return picked.log_softmax(dim=-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------- the product object
class TokenwiseConstraint(TrainerCallback):
    """The token-wise constrained loss against the aligned model, as ``compute_loss_func`` plus a callback.

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
    a trainer that does not use this object as its ``compute_loss_func``; an encoder-decoder model; a reference that
    shares parameters with the trained model.

    Example:
        >>> from ssah_plugin import SSAHCallback, TokenwiseConstraint
        >>> constraint = TokenwiseConstraint(model)                        # doctest: +SKIP
        >>> trainer = SFTTrainer(model=model, args=args, train_dataset=ds,  # doctest: +SKIP
        ...                      compute_loss_func=constraint,
        ...                      callbacks=[SSAHCallback("mask.safetensors"), constraint])
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
        _refuse_encoder_decoder(aligned_model)
        _refuse_zero3(aligned_model, where="the aligned model")
        if copy:
            reference = _copy.deepcopy(aligned_model)
        else:
            reference = aligned_model
        reference.requires_grad_(False)
        reference.eval()
        self.reference: nn.Module = reference
        self.copied = copy
        self._model: nn.Module | None = None
        self._handles: list = []
        self._captured: dict | None = None
        self._pending_grad = False
        self._placed = False
        self.calls = 0  # compute_loss_func calls (train and eval)
        self._stats = torch.zeros(4, dtype=torch.float64)  # sum/count of Delta on prefix, sum/count on the rest

    # ------------------------------------------------------------------ the loss (compute_loss_func)
    def __call__(self, outputs, labels: torch.Tensor | None, num_items_in_batch=None) -> torch.Tensor:
        """``compute_loss_func(outputs, labels, num_items_in_batch)``; runs after the training model's forward,
        before ``backward``."""
        captured, self._captured = self._captured, None
        self._pending_grad = False
        if captured is None:
            raise UnsupportedSetupError(
                "TokenwiseConstraint was called as compute_loss_func, but no forward of the training model was "
                "seen: its hook is not installed. Fix: also pass the same object as a callback, "
                "Trainer(..., compute_loss_func=constraint, callbacks=[constraint]).")
        logits = getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, dict):
            logits = outputs.get("logits")
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

        if not self._placed and self._model is not None:  # e.g. trainer.evaluate() before any train()
            self._place_reference(self._model)
        ref_logits = self._reference_logits(captured)
        ref_pred = ref_logits if shift_labels is not None else ref_logits[:, :-1]
        safe_targets = targets.clamp(min=0)
        policy_lp = _target_logps(pred_logits, safe_targets, keep)
        with torch.no_grad():
            ref_lp = _target_logps(ref_pred.to(logits.device), safe_targets, keep)
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
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits

    # ------------------------------------------------------------------ hooks on the training model
    def _capture(self, module, args, kwargs):
        if self._pending_grad and torch.is_grad_enabled() and module.training:
            raise UnsupportedSetupError(
                "two training forwards ran without the constrained loss in between: the trainer does not use "
                "TokenwiseConstraint as its loss. Fix: pass compute_loss_func=constraint to Trainer / SFTTrainer "
                "(trainers whose own compute_loss ignores compute_loss_func, e.g. DPOTrainer, are not supported).")
        self._captured = {"args": tuple(args), "kwargs": dict(kwargs), "autocast": None}
        self._pending_grad = torch.is_grad_enabled() and module.training
        return None

    def _capture_autocast(self, module, args):
        if self._captured is not None:
            dev = model_device(module).type
            on = torch.is_autocast_enabled(dev)
            self._captured["autocast"] = (dev, on, torch.get_autocast_dtype(dev) if on else None)
        return None

    def _attach(self, model: nn.Module) -> None:
        if self._model is model and self._handles:
            return
        self._detach()
        self._handles.append(model.register_forward_pre_hook(self._capture, with_kwargs=True))
        emb = None
        try:
            emb = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            pass
        if isinstance(emb, nn.Module):
            self._handles.append(emb.register_forward_pre_hook(self._capture_autocast))
        self._model = model

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._model = None

    def close(self) -> None:
        """Remove the hooks from the training model (the trainer can then no longer use this loss)."""
        self._detach()

    # ------------------------------------------------------------------ callback events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._check(args, model, _find_trainer(self))
        if model is not None:
            self._attach(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise UnsupportedSetupError("TokenwiseConstraint needs the model in on_train_begin; use it with "
                                        "transformers.Trainer or a TRL trainer.")
        self._check(args, model, _find_trainer(self))
        self._place_reference(model)
        self._attach(model)
        self._captured, self._pending_grad = None, False  # nothing left over from an interrupted run
        self._stats.zero_()
        _move_to_front(self, _find_trainer(self))
        if state.is_world_process_zero:
            logger.info("ssah-plugin: token-wise constraint on, betas %s then %g, reference %s (%s, %s)",
                        self.betas, self.beta_rest, "copy" if self.copied else "given model",
                        model_device(self.reference), _dtype_of(self.reference))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not bool(self._stats[[1, 3]].sum()):
            return
        s = self._stats.tolist()
        added = {}
        if s[1]:
            added["tokenwise/logratio_prefix"] = round(s[0] / s[1], 6)
        if s[3]:
            added["tokenwise/logratio_rest"] = round(s[2] / s[3], 6)
        logs.update(added)
        if state.log_history and state.log_history[-1] is not logs:
            state.log_history[-1].update(added)
        self._stats.zero_()

    # ------------------------------------------------------------------ set-up checks
    def _check(self, args, model, trainer) -> None:
        _refuse_zero3(model, where="the training model", args=args)
        if model is not None:
            _refuse_encoder_decoder(model)
            ref_ptrs = {p.data_ptr() for p in self.reference.parameters() if p.numel()}
            if any(p.data_ptr() in ref_ptrs for p in model.parameters() if p.numel()):
                raise UnsupportedSetupError(
                    "the reference model shares parameters with the model being trained, so it would move with "
                    "it. Fix: TokenwiseConstraint(model) (copy=True, the default) or copy=False with a separately "
                    "loaded copy of the aligned weights.")
        if args is not None and getattr(args, "label_smoothing_factor", 0) not in (0, 0.0, None):
            raise UnsupportedSetupError(
                f"label_smoothing_factor={args.label_smoothing_factor}: the Trainer does not apply label smoothing "
                "when a compute_loss_func is given, so it would be silently dropped. Fix: set "
                "label_smoothing_factor=0 with TokenwiseConstraint.")
        if args is not None and getattr(args, "packing", False):
            strategy = getattr(args, "packing_strategy", "bfd")
            padding_free = getattr(trainer, "padding_free", None) if trainer is not None else None
            if padding_free is None:
                padding_free = bool(getattr(args, "padding_free", False)) or strategy in ("bfd", "bfd_split")
            # "wrapped" / "bfd_split" cut long sequences: position_ids restart mid-sequence even when padding-free
            if strategy != "bfd" or not padding_free:
                raise UnsupportedSetupError(
                    f"packing (packing_strategy={strategy!r}) joins or cuts sequences without position_ids that "
                    "restart exactly at each sequence, so the response-token positions that set beta_t cannot be "
                    "recovered. Fix: packing_strategy='bfd' (padding-free, position_ids restart per sequence), or "
                    "packing=False.")
        if trainer is not None:
            if getattr(trainer, "compute_loss_func", None) is not self:
                raise UnsupportedSetupError(
                    f"{type(trainer).__name__} was given TokenwiseConstraint as a callback but not as its loss. "
                    "Fix: pass the same object twice, compute_loss_func=constraint and callbacks=[constraint] "
                    "(transformers.Trainer and TRL SFTTrainer accept compute_loss_func).")

    def _place_reference(self, model: nn.Module) -> None:
        device = model_device(model)
        dtype = _dtype_of(model)
        ref_dtype = _dtype_of(self.reference)
        if dtype is not None and ref_dtype is not None and dtype != ref_dtype:
            # DeepSpeed bf16/fp16 casts the training model's parameters (not its buffers, e.g. rotary inv_freq stays
            # float32) and not our copy: the reference follows, parameters only, so both forwards compute alike
            with torch.no_grad():
                for p in self.reference.parameters():
                    if p.is_floating_point():
                        p.data = p.data.to(dtype)
        if model_device(self.reference) != device:
            self.reference.to(device)
        self.reference.eval()
        self._placed = True


# ---------------------------------------------------------------------------------------------- helpers
def _dtype_of(module: nn.Module) -> torch.dtype | None:
    """The dtype of the input embeddings (else the first floating parameter): what the forward computes in."""
    try:
        emb = module.get_input_embeddings()
        w = getattr(emb, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point() and w.numel():
            return w.dtype
    except (AttributeError, NotImplementedError):
        pass
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _refuse_encoder_decoder(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedSetupError(
            f"{type(model).__name__} is an encoder-decoder model; the token-wise constraint is implemented for "
            "causal language models (labels shifted by one). Fix: use a decoder-only chat model.")


def _refuse_zero3(model: nn.Module | None, *, where: str, args=None) -> None:
    zero3 = model is not None and any(hasattr(p, "ds_tensor") for p in model.parameters())
    if not zero3 and args is not None and getattr(args, "deepspeed", None):
        cfg = getattr(args, "hf_deepspeed_config", None)
        zero3 = bool(cfg is not None and hasattr(cfg, "is_zero3") and cfg.is_zero3())
    if zero3:
        raise UnsupportedSetupError(
            f"DeepSpeed ZeRO-3 is on ({where}): the reference model of the token-wise constraint would need ZeRO-3 "
            "sharding of its own, which is not implemented (a full copy per rank defeats ZeRO-3). Fix: use ZeRO-2 "
            "or ZeRO-1 (integrations/deepspeed/zero2.json), where the reference is one more full copy per rank.")


def _move_to_front(callback, trainer) -> None:
    """Run ``on_log`` before the reporting callbacks (TensorBoard, W&B, ...) so they receive our metrics."""
    cbs = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
    if isinstance(cbs, list) and callback in cbs and cbs[0] is not callback:
        cbs.remove(callback)
        cbs.insert(0, callback)


def _find_trainer(callback) -> object | None:
    """The Trainer whose callback handler is running this event (found on the call stack), or None."""
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        handler = getattr(obj, "callback_handler", None)
        if handler is not None and callback in getattr(handler, "callbacks", ()):
            return obj
        frame = frame.f_back
    return None
