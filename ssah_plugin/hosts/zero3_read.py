"""Reading ZeRO-3 parameters at set-up: the fingerprint from each rank's own partition, full values for digests.

Under ZeRO-3 a parameter's ``data`` is an empty placeholder; rank ``r`` of the parameter's partition group
(``param.ds_process_group``) holds elements ``[r * part, (r + 1) * part)`` of its flattening in ``param.ds_tensor``
(``part = ds_tensor.ds_numel``, the same on every rank; the last partition is padded past ``ds_numel``), as
``deepspeed/runtime/zero/partition_parameters.py`` (``Init._partition_param``) lays it out in DeepSpeed 0.19.

* :func:`zero3_fingerprint_samples`: every rank takes the fingerprint samples that fall into its own partition
  (:func:`ssah_plugin.core.fingerprint.partial_fingerprint_samples`) and one ``all_reduce`` (sum) of a
  ``[tensors, 32]`` float32 block per process group combines them; no rank gathers a whole tensor. The core check
  (:meth:`ssah_plugin.core.mask.Mask.validate`) then compares those samples unchanged.
* :func:`gather_full`: the whole value of one parameter (``deepspeed.zero.GatheredParameters``), for the per-unit
  base-value digests, which need every frozen value.

Both are collectives: every rank must call them, in the same order, at set-up (``on_init_end``,
``on_train_begin``, :func:`ssah_plugin.deepspeed_enforce`), never during ``backward()`` or ``optimizer.step()``.
DeepSpeed is imported only inside the functions, and only once a parameter is known to be partitioned.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ssah_plugin.core.fingerprint import partial_fingerprint_samples
from ssah_plugin.core.mask import Mask
from ssah_plugin.core.peft_layout import find_weight
from ssah_plugin.core.units import unwrap_model
from ssah_plugin.errors import require
from ssah_plugin.hosts.zero import is_zero3_partitioned, zero_stage

__all__ = ["gather_full", "validate_mask", "zero3_fingerprint_getter", "zero3_fingerprint_samples"]

GetTensor = Callable[[str, nn.Parameter], torch.Tensor | None]


def _readable(param: nn.Parameter) -> bool:
    """Whether this rank's partition holds plain values (not quantized, not swapped out to NVMe)."""
    part = param.ds_tensor
    return getattr(part, "ds_quant_scale", None) is None and getattr(part, "final_location", None) is None


def zero3_fingerprint_samples(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The fingerprint samples (float32, CPU) of ZeRO-3 partitioned ``params``, read from each rank's partition.

    A collective: one ``all_reduce`` of ``[len(params), N_SAMPLES]`` float32 values per partition group (usually
    one), called by every rank with the same names in the same order. Parameters that are not partitioned, or
    whose partition holds no plain values (quantized, on NVMe), are left out of the result.
    """
    comm = require("deepspeed.comm", "deepspeed", "ssah-plugin under DeepSpeed ZeRO-3")
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    groups: dict[int, tuple[object, list[str], list[torch.Tensor]]] = {}
    for name, p in params.items():
        if not (is_zero3_partitioned(p) and _readable(p)):
            continue
        group = getattr(p, "ds_process_group", None)
        local = p.ds_tensor.data.reshape(-1)
        start = comm.get_rank(group=group) * local.numel()
        _, names, parts = groups.setdefault(id(group), (group, [], []))
        names.append(name)
        parts.append(partial_fingerprint_samples(local, start, int(p.ds_numel)).to(device))
    out: dict[str, torch.Tensor] = {}
    for group, names, parts in groups.values():
        block = torch.stack(parts)  # [tensors, N_SAMPLES]: every position comes from exactly one rank
        comm.all_reduce(block, group=group)
        out.update(zip(names, block.cpu().unbind(0)))
    return out


def zero3_fingerprint_getter(mask: Mask, model: nn.Module) -> GetTensor:
    """A ``get_tensor`` for :meth:`Mask.validate` that hands over the fingerprint samples of partitioned tensors.

    Takes the samples of every fingerprinted tensor now (:func:`zero3_fingerprint_samples`, one collective); the
    returned function gives those 32 values for a partitioned parameter (a vector of ``N_SAMPLES`` is its own sample
    set, so the core comparison runs unchanged), the parameter itself otherwise, ``None`` when its partition cannot
    be read (the tensor is skipped, as packed quantized weights are).
    """
    root = unwrap_model(model)
    params: dict[str, nn.Parameter] = {}
    for name in mask.fingerprint:
        module, _, pname = name.rpartition(".")
        p = find_weight(root, module, pname)
        if p is not None:
            params[name] = p
    samples = zero3_fingerprint_samples(params)

    def get(name: str, param: nn.Parameter) -> torch.Tensor | None:
        if not is_zero3_partitioned(param):
            return param
        return samples.get(name)

    return get


def validate_mask(mask: Mask, model: nn.Module, *, check_fingerprint: bool = True) -> None:
    """:meth:`Mask.validate` on any host; under ZeRO-3 the fingerprint comes from the ranks' partitions.

    Call it on every rank (under ZeRO-3 it is a collective). A wrong model raises the same
    :class:`~ssah_plugin.errors.MaskMismatchError` on every rank, since every rank compares the same samples.
    """
    get = zero3_fingerprint_getter(mask, model) if check_fingerprint and mask.fingerprint and \
        zero_stage(model) == 3 else None
    mask.validate(model, check_fingerprint=check_fingerprint, get_tensor=get)


def gather_full(name: str, param: nn.Parameter) -> torch.Tensor | None:
    """The full value of a parameter (gathered under ZeRO-3), for the base-value digests. A collective under ZeRO-3:
    every rank calls it for the same parameters in the same order."""
    if not is_zero3_partitioned(param):
        return param
    deepspeed = require("deepspeed", "deepspeed", "ssah-plugin under DeepSpeed ZeRO-3")
    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.data.detach().clone()
