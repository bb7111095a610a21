"""Hooks on the training model that let a loss repeat its forward on another model (the constraint's reference).

:class:`ForwardRecorder` registers, on the model being trained:

* a forward pre-hook that records each call's positional and keyword inputs (``input_ids``, ``attention_mask``,
  ``position_ids``, ...), before the forward runs;
* a forward pre-hook on the input embeddings that records the autocast state the forward runs under (bf16 / fp16
  mixed precision), so the reference can run under the same one;
* a forward hook that, for a training forward (gradients on, ``module.training``), registers a gradient hook on the
  output logits. It fires inside ``backward()`` when the gradient reaches the logits, before any parameter gradient
  exists (so before clipping and any optimizer step, also under DeepSpeed, whose step runs inside ``backward``), and
  raises if the loss that produced this gradient did not consume the recording (:meth:`take`).

A second training forward before the previous one's recording was taken is refused in the pre-hook, as is a training
forward that asks for a fused loss head (``fused_lm_head=True``: the trainer computes its own loss).
"""
from __future__ import annotations

import torch
from torch import nn

from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.io.models import model_device

__all__ = ["ForwardRecorder", "logits_of"]


def logits_of(outputs) -> torch.Tensor | None:
    """``outputs.logits`` (a ``ModelOutput`` or a dict), or ``None``."""
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    return logits if isinstance(logits, torch.Tensor) else None


class ForwardRecorder:
    """Record the inputs of every forward of one model; ``not_its_loss`` is the refusal message."""

    def __init__(self, not_its_loss: str):
        self.not_its_loss = not_its_loss
        self.model: nn.Module | None = None
        self.pending_grad = False  # a training forward ran whose recording has not been taken yet
        self._handles: list = []
        self._record: dict | None = None
        self._seen = self._used = 0  # training forwards recorded / taken

    def attach(self, model: nn.Module) -> None:
        """Register the hooks on ``model`` (moving them from a previous model); a no-op for the same model."""
        if self.model is model and self._handles:
            return
        self.detach()
        self._handles.append(model.register_forward_pre_hook(self._capture, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._guard_logits, with_kwargs=True))
        emb = None
        try:
            emb = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            pass
        if isinstance(emb, nn.Module):
            self._handles.append(emb.register_forward_pre_hook(self._capture_autocast))
        self.model = model

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.model = None

    def reset(self) -> None:
        """Forget a recording left over from an interrupted run."""
        self._record, self.pending_grad = None, False

    def take(self) -> dict | None:
        """The last forward's ``{"args", "kwargs", "autocast"}`` (``None`` if none was recorded); marks it used."""
        record, self._record = self._record, None
        if record is not None:
            self.pending_grad = False
            self._used = record["seen"]
        return record

    # ------------------------------------------------------------------ hooks
    def _capture(self, module, args, kwargs):
        training = torch.is_grad_enabled() and module.training
        if training and (self.pending_grad or kwargs.get("fused_lm_head")):
            raise UnsupportedSetupError(self.not_its_loss)
        if training:
            self._seen += 1
        self._record = {"args": tuple(args), "kwargs": dict(kwargs), "autocast": None, "seen": self._seen}
        self.pending_grad = training
        return None

    def _guard_logits(self, module, args, kwargs, outputs):
        logits = logits_of(outputs) if self.pending_grad else None
        if logits is not None and logits.requires_grad:
            seen = self._seen

            def check(grad: torch.Tensor, seen: int = seen) -> None:
                if self._used < seen:
                    raise UnsupportedSetupError(self.not_its_loss)

            logits.register_hook(check)
        return None

    def _capture_autocast(self, module, args):
        if self._record is not None:
            dev = model_device(module).type
            on = torch.is_autocast_enabled(dev)
            self._record["autocast"] = (dev, on, torch.get_autocast_dtype(dev) if on else None)
        return None
