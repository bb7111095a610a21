"""Set-up checks and reference placement for :class:`~ssah_plugin.recipes.constrained.TokenwiseConstraint`.

Everything here runs at set-up: when the constraint is made, in ``TokenwiseConstraint.attach(trainer)`` and again in
``on_train_begin`` (after ``accelerator.prepare``), never inside a training step. Refusals raise
:class:`~ssah_plugin.errors.UnsupportedSetupError` with the fix in the message.
"""
from __future__ import annotations

import torch
from torch import nn

from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.hosts.zero import zero_stage
from ssah_plugin.io.models import model_device

__all__ = ["check_setup", "refuse_encoder_decoder", "refuse_zero3", "place_reference", "dtype_of"]


def dtype_of(module: nn.Module) -> torch.dtype | None:
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


def refuse_encoder_decoder(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedSetupError(
            f"{type(model).__name__} is an encoder-decoder model; the token-wise constraint is implemented for "
            "causal language models (labels shifted by one). Fix: use a decoder-only chat model.")


def refuse_zero3(model: nn.Module | None, *, where: str, args=None) -> None:
    """Refuse DeepSpeed ZeRO-3: partitioned parameters in ``model``, or a ZeRO-3 config in the trainer ``args``."""
    if zero_stage(model) == 3 or (args is not None and zero_stage(args) == 3):
        raise UnsupportedSetupError(
            f"DeepSpeed ZeRO-3 is on ({where}): the reference model of the token-wise constraint would need ZeRO-3 "
            "sharding of its own, which is not implemented (a full copy per rank defeats ZeRO-3). Fix: use ZeRO-2 "
            "or ZeRO-1 (integrations/deepspeed/zero2.json), where the reference is one more full copy per rank.")


def check_setup(args, model: nn.Module | None, reference: nn.Module, *, padding_free: bool | None = None) -> None:
    """Everything the trainer's arguments and model must satisfy for the constrained loss to be the loss applied.

    ``padding_free`` is the trainer's own decision when it has one (TRL ``SFTTrainer.padding_free``); without it the
    rule TRL applies is used: ``args.padding_free``, or packing with ``packing_strategy`` ``"bfd"`` / ``"bfd_split"``.
    """
    refuse_zero3(model, where="the training model", args=args)
    if model is not None:
        refuse_encoder_decoder(model)
        ref_ptrs = {p.data_ptr() for p in reference.parameters() if p.numel()}
        if any(p.data_ptr() in ref_ptrs for p in model.parameters() if p.numel()):
            raise UnsupportedSetupError(
                "the reference model shares parameters with the model being trained, so it would move with "
                "it. Fix: TokenwiseConstraint(model) (copy=True, the default) or copy=False with a separately "
                "loaded copy of the aligned weights.")
    if args is None:
        return
    if getattr(args, "label_smoothing_factor", 0) not in (0, 0.0, None):
        raise UnsupportedSetupError(
            f"label_smoothing_factor={args.label_smoothing_factor}: the Trainer does not apply label smoothing "
            "when a compute_loss_func is given, so it would be silently dropped. Fix: set "
            "label_smoothing_factor=0 with TokenwiseConstraint.")
    loss_type = getattr(args, "loss_type", None)
    if loss_type not in (None, "nll"):
        raise UnsupportedSetupError(
            f"{type(args).__name__}(loss_type={loss_type!r}): this trainer computes a loss of its own kind, which the "
            "token-wise constraint would replace or be ignored by. Fix: use TokenwiseConstraint with "
            "transformers.Trainer or TRL SFTTrainer (loss_type='nll').")
    if getattr(args, "packing", False):
        strategy = getattr(args, "packing_strategy", "bfd")
        if padding_free is None:
            padding_free = bool(getattr(args, "padding_free", False)) or strategy in ("bfd", "bfd_split")
        # "wrapped" / "bfd_split" cut long sequences: position_ids restart mid-sequence even when padding-free
        if strategy != "bfd" or not padding_free:
            raise UnsupportedSetupError(
                f"packing (packing_strategy={strategy!r}) joins or cuts sequences without position_ids that "
                "restart exactly at each sequence, so the response-token positions that set beta_t cannot be "
                "recovered. Fix: packing_strategy='bfd' (padding-free, position_ids restart per sequence), or "
                "packing=False.")


def place_reference(reference: nn.Module, model: nn.Module) -> None:
    """Move ``reference`` to ``model``'s device and cast its floating parameters to ``model``'s compute dtype.

    DeepSpeed bf16/fp16 casts the training model's parameters (not its buffers: rotary ``inv_freq`` stays float32)
    and not the reference; the reference follows, parameters only, so both forwards compute alike.
    """
    dtype, ref_dtype = dtype_of(model), dtype_of(reference)
    if dtype is not None and ref_dtype is not None and dtype != ref_dtype:
        with torch.no_grad():
            for p in reference.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
    device = model_device(model)
    if model_device(reference) != device:
        reference.to(device)
    reference.eval()
