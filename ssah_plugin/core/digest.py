"""Digests of unit values: the exact check that frozen slices hold the mask's base values.

A mask (format version 2) stores, for every slice map ``s`` of every unit group and every unit ``u``, an 8-byte
digest of that unit's base values in each of the dtypes a model is trained in (:data:`DIGEST_DTYPES`)::

    values(u) = W.index_select(axis, index[u]).movedim(axis, 0)     # C-contiguous
    digest(u, dtype) = blake2b(little-endian bytes of values(u).to(dtype), digest_size=8)

The dtype rule: a live tensor of dtype ``d`` is compared with the digests recorded for ``d``. Casting is exact in the
directions users take (a bf16 checkpoint loaded as fp32 holds ``float32(bf16(x))``; an fp32 base cast to bf16 holds
``bf16(x)``, which is what was hashed), so equality of digests means bitwise equality of the values, up to the
2^-64 chance of a collision. Tensors in other dtypes (float64, int8 / 4-bit quantized) are not checked and are
reported as such.

The check runs where enforcement starts (:func:`ssah_plugin.hosts.enforce.build_enforcer`): at every ``Trainer.train()``
start, including resume and ``add_callback``, and when :class:`~ssah_plugin.SSAHOptimizer` is built, before the
snapshot is taken, so the values held from then on are the base's.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ssah_plugin.core.peft_layout import find_weight, holds_values
from ssah_plugin.core.units import SliceMap, UnitGroup, unwrap_model

__all__ = ["DIGEST_DTYPES", "DIGEST_BYTES", "DIGEST_ALGORITHM", "unit_values", "unit_digests", "record_digests",
           "BaseCheck", "check_base_values"]

#: dtype name (as stored in the mask file) -> torch dtype.
DIGEST_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                         "float16": torch.float16}
DIGEST_BYTES = 8
DIGEST_ALGORITHM = "blake2b-64 per unit and slice, values cast to the dtype, little-endian"
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The stored name of a digest dtype, or ``None`` when values of this dtype are not digested."""
    for name, d in DIGEST_DTYPES.items():
        if d == dtype:
            return name
    return None


def unit_values(tensor: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``[n_units, m]``: row ``u`` holds the values of ``tensor`` at ``index[u]`` along ``axis`` (see module doc)."""
    n = index.shape[0]
    flat = index.reshape(-1).to(tensor.device)
    v = tensor.detach().index_select(axis, flat).movedim(axis, 0)
    return v.reshape(n, -1)


def unit_digests(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 ``[n_units, 8]``: the digest of every row of ``values`` (:func:`unit_values`) cast to ``dtype``."""
    n = values.shape[0]
    v = values.to(dtype).contiguous().cpu().view(_BITS[dtype]).numpy()
    raw = v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes()
    row = len(raw) // n if n else 0
    view = memoryview(raw)
    out = bytearray(n * DIGEST_BYTES)
    for i in range(n):
        out[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES] = hashlib.blake2b(view[i * row:(i + 1) * row],
                                                                       digest_size=DIGEST_BYTES).digest()
    return torch.frombuffer(out, dtype=torch.uint8).reshape(n, DIGEST_BYTES).clone() if n else \
        torch.zeros((0, DIGEST_BYTES), dtype=torch.uint8)


def _readable(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` detached, or ``None`` when its values cannot be read here (packed quantized, a ZeRO-3 placeholder
    outside a gather, the meta device). A ZeRO-3 parameter inside ``GatheredParameters`` holds all its values
    (:func:`holds_values`) and is read like any tensor."""
    if t is None or getattr(t, "quant_state", None) is not None or t.device.type == "meta" \
            or (getattr(t, "ds_shape", None) is not None and not holds_values(t)):
        return None
    return t.detach()


def record_digests(groups: Sequence[UnitGroup], get: Callable[[SliceMap], torch.Tensor | None],
                   dtypes: Iterable[str]) -> tuple[dict[str, list[list[torch.Tensor]]], list[str]]:
    """The digests of every unit's base values, ``dtype name -> per group -> per slice``, and the unreadable tensors.

    ``get(slice)`` returns the base tensor the slice indexes (``None`` when absent). Slices of one tensor are
    adjacent in a mask, so one tensor is held in memory at a time. Used by
    :meth:`ssah_plugin.core.mask.Mask.record_base`.
    """
    names = list(dtypes)
    out: dict[str, list[list[torch.Tensor]]] = {d: [] for d in names}
    problems: list[str] = []
    cache: dict[str, torch.Tensor | None] = {}
    for g in groups:
        per: dict[str, list[torch.Tensor]] = {d: [] for d in names}
        for s in g.slices:
            if s.name not in cache:
                cache.clear()
                cache[s.name] = _readable(get(s))
            t = cache[s.name]
            if t is None or tuple(t.shape) != tuple(s.shape) or not t.is_floating_point():
                problems.append(s.name)
                continue
            vals = unit_values(t, s.axis, s.index)
            for d in names:
                per[d].append(unit_digests(vals, DIGEST_DTYPES[d]))
        for d in names:
            out[d].append(per[d])
    return out, problems


class BaseCheck:
    """What :func:`check_base_values` found: checked slices, unchecked ones (and why), mismatches, a digest."""

    def __init__(self) -> None:
        self.checked: int = 0  # (slice, unit) pairs compared with the mask's digests
        self.unchecked: list[str] = []  # "name (reason)"
        self.mismatched: list[tuple[str, int, int]] = []  # (slice name, frozen units differing, frozen units)
        self.values_digest: str = ""  # sha256 over the live digests of every frozen (slice, unit), in mask order

    @property
    def complete(self) -> bool:
        """True when every frozen slice was compared with the mask's base digests."""
        return self.checked > 0 and not self.unchecked

    def as_dict(self) -> dict:
        return {"checked": self.checked, "unchecked": list(self.unchecked), "values_digest": self.values_digest,
                "mismatched": [list(m) for m in self.mismatched]}


def check_base_values(mask, model: nn.Module, policy: str | None = None, *,
                      get_tensor: Callable[[str, nn.Parameter], torch.Tensor | None] | None = None) -> BaseCheck:
    """Compare the live values of every frozen unit under ``policy`` with the mask's base digests.

    Does not raise: the caller decides (:func:`ssah_plugin.hosts.enforce.build_enforcer` raises
    :class:`~ssah_plugin.errors.FrozenValuesError` on mismatches). ``get_tensor(name, param)`` returns the full
    tensor (DeepSpeed ZeRO-3 gathers it; every rank must call this function in the same order).
    Also computes ``values_digest``, a fingerprint of exactly the frozen values (saved with checkpoints by
    :class:`~ssah_plugin.SSAHCallback`), whether or not the mask holds digests.
    """
    root = unwrap_model(model)
    report = BaseCheck()
    total = hashlib.sha256()
    for gi, (g, frozen) in enumerate(zip(mask.groups, mask.frozen(policy))):
        units = frozen.nonzero().reshape(-1)
        if units.numel() == 0:
            continue
        for si, s in enumerate(g.slices):
            param = find_weight(root, s.module, s.param)
            if param is None:
                report.unchecked.append(f"{s.name} (not found)")
                continue
            if getattr(param, "quant_state", None) is not None or dtype_name(param.dtype) is None:
                report.unchecked.append(f"{s.name} (dtype {param.dtype} is not digested)")
                continue
            full = get_tensor(s.name, param) if get_tensor is not None else param
            if full is None:
                report.unchecked.append(f"{s.name} (not readable here)")
                continue
            name = dtype_name(full.dtype)
            live = unit_digests(unit_values(full, s.axis, s.index[units]), full.dtype)
            total.update(f"{gi}.{si}.{name}".encode())
            total.update(live.numpy().tobytes())
            stored = mask.digests.get(name, None) if mask.digests else None
            if stored is None:
                report.unchecked.append(f"{s.name} (mask holds no {name} digests)")
                continue
            ref = stored[gi][si][units]
            differ = int((live != ref).any(dim=1).sum())
            report.checked += int(units.numel())
            if differ:
                report.mismatched.append((s.name, differ, int(units.numel())))
    report.values_digest = total.hexdigest()
    return report
