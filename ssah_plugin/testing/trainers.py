"""The ``transformers.Trainer`` reference for the callback tests: frozen gradients zeroed and frozen values written
back by hand, with dense boolean masks (:func:`ssah_plugin.testing.oracles.dense_frozen_masks`).

``HandMaskedTrainer.training_step`` zeroes the frozen gradient elements after every ``backward()`` (so before
grad-norm clipping); ``HandRestore.on_optimizer_step`` writes the base values back right after ``optimizer.step()``
(before the scheduler and ``zero_grad()``), where ``SSAHCallback`` restores.
"""
from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from ssah_plugin.testing.oracles import hand_mask_grads, hand_restore

__all__ = ["HandMaskedTrainer", "HandRestore", "grad_norms", "logged_losses"]


class HandMaskedTrainer(Trainer):
    """A Trainer that zeroes the frozen gradients by hand after every backward (``dense``: name -> boolean mask of
    the frozen elements; given to the constructor or set before ``train()``)."""

    def __init__(self, *args, dense: dict[str, torch.Tensor] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.dense = dense if dense is not None else {}

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        hand_mask_grads(model, self.dense)
        return loss


class HandRestore(TrainerCallback):
    """Write ``base`` back into the ``dense`` positions after every optimizer step."""

    def __init__(self, dense: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
        self.dense, self.base = dense, base

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        hand_restore(model, self.dense, self.base)


def grad_norms(trainer) -> list[float]:
    """The ``grad_norm`` of every log record (one per step with ``logging_steps=1``)."""
    return [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]


def logged_losses(trainer) -> list[float]:
    """The training ``loss`` of every log record."""
    return [r["loss"] for r in trainer.state.log_history if "loss" in r]
