"""Check, from the saved files alone, that a fine-tuned checkpoint left the frozen units of a mask untouched.

:func:`verify_checkpoint` reads the base and the tuned checkpoint lazily (:mod:`ssah_plugin.io.checkpoint`: one
unit-bearing tensor at a time, in row chunks, never the model), compares every weight slice owned by a frozen unit,
and returns a :class:`VerifyReport` with, per unit class (when the mask has classes), per layer and per unit group,
the number of frozen units, how many changed, how many drifted beyond the tolerance, and the maximum absolute
drift. Trainable units are summarised too (to show that training did change the model).

Comparison rules (decisions, each tested):

* **Tolerance.** A frozen unit *violates* when the maximum absolute difference over all its elements exceeds
  ``tolerance`` (default ``0.0``: any change, i.e. the promised bit-exactness; ``0.0`` and ``-0.0`` compare equal,
  a NaN where the base has a number is an infinite drift, NaN in both places is no drift).
* **Dtypes.** When the checkpoints store a tensor in different dtypes (base fp32, tuned saved in bf16), the base is
  cast to the *tuned* dtype and the two are compared exactly there: a frozen unit trained in bf16 starts from the
  bf16-rounded base, and round-to-nearest is what ``model.to(torch.bfloat16)`` does. Casting the other way (tuned
  up to fp32) would report the rounding error of every frozen value as drift. Every such cast is listed in
  ``report.dtype_casts`` (and warned about), so a reader knows the check was made at the lower precision.
* **Missing tensors, other models.** A unit-bearing tensor missing from either checkpoint, a shape that differs
  from the mask's record, an architecture that differs from ``config.json``, or base weights that do not match the
  mask's fingerprint raise one error listing every problem (CLI exit code 2), never a partial report.
* **PEFT adapters.** A ``tuned`` folder with ``adapter_config.json`` is merged into ``base`` with PEFT first
  (:func:`ssah_plugin.io.checkpoint.open_checkpoint`), so what is verified is the deployed (merged) weight.

Example:
    >>> from ssah_plugin.evaluation.verify import verify_checkpoint
    >>> report = verify_checkpoint("base/", "out/final/", "mask.safetensors")   # doctest: +SKIP
    >>> report.ok, report.total.max_drift                                        # doctest: +SKIP
    (True, 0.0)
"""
from __future__ import annotations

import logging
import math
import os
import warnings

import torch

from ssah_plugin.core.classes import CLASS_NAMES
from ssah_plugin.core.fingerprint import fingerprint_mismatches
from ssah_plugin.core.mask import Mask
from ssah_plugin.errors import DataError, MaskMismatchError
from ssah_plugin.evaluation.verify_report import EXIT_DRIFT, EXIT_ERROR, EXIT_OK, DriftStats, VerifyReport
from ssah_plugin.io.checkpoint import TensorSource, open_checkpoint

__all__ = ["verify_checkpoint", "VerifyReport", "DriftStats", "EXIT_OK", "EXIT_DRIFT", "EXIT_ERROR"]

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 24  # rows read per step: at most ~16M elements (64 MiB in fp32) per tensor


# ---------------------------------------------------------------------------------------------------- internals
def _channel_drift(base: TensorSource, tuned: TensorSource, name: str, axis: int, shape: tuple[int, ...],
                   casts: list[dict]) -> torch.Tensor:
    """Max |tuned - base| per index along ``axis`` (float64 [shape[axis]]), read in row chunks."""
    b_dtype, t_dtype = base.dtype(name), tuned.dtype(name)
    if not isinstance(t_dtype, torch.dtype) or not isinstance(b_dtype, torch.dtype):
        raise DataError(f"{name}: stored as {b_dtype} / {t_dtype}; only torch-readable dtypes can be compared "
                        "(dequantise quantised checkpoints first)")
    if b_dtype != t_dtype:
        casts.append({"tensor": name, "base_dtype": str(b_dtype).replace("torch.", ""),
                      "tuned_dtype": str(t_dtype).replace("torch.", "")})
    cmp = torch.float64 if t_dtype == torch.float64 else torch.float32
    rows = shape[0] if shape else 1
    per_row = max(1, math.prod(shape[1:]) if len(shape) > 1 else 1)
    step = max(1, _CHUNK_ELEMENTS // per_row)
    out = torch.zeros(shape[axis] if shape else 1, dtype=torch.float64)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        t = tuned.get_rows(name, start, stop)
        b = base.get_rows(name, start, stop).to(t.dtype)  # the decision: compare in the tuned dtype
        t, b = t.to(cmp), b.to(cmp)
        diff = (t - b).abs_()  # 0.0 vs -0.0 gives 0
        if torch.isnan(diff).any():  # rare: NaN in both places is no drift, NaN in one place is infinite drift
            same = (t == b) | (torch.isnan(t) & torch.isnan(b))
            diff = torch.where(same, torch.zeros((), dtype=cmp), diff).nan_to_num_(nan=math.inf)
        if axis == 0:
            red = diff.reshape(stop - start, -1).amax(dim=1) if diff.dim() > 1 else diff
            out[start:stop] = red.to(torch.float64)
        else:
            red = diff.movedim(axis, 0).reshape(shape[axis], -1).amax(dim=1)
            out = torch.maximum(out, red.to(torch.float64))
        del t, b, diff
    return out


def _check_inputs(mask: Mask, base: TensorSource, tuned: TensorSource, names: dict[str, tuple]) -> None:
    problems: list[str] = []
    mt = base.model_type()
    if mt is not None and mt != mask.architecture:
        problems.append(f"the mask was made for architecture {mask.architecture!r}, the base checkpoint's "
                        f"config.json says {mt!r}")
    for name, shape in names.items():
        key = base.resolve(name)
        if key is None:
            problems.append(f"base checkpoint has no tensor {name}")
        elif tuple(base.shape(name)) != tuple(shape):
            problems.append(f"{name}: mask records shape {list(shape)}, base checkpoint has {list(base.shape(name))}")
    if problems:
        raise MaskMismatchError(problems, context=f"the mask does not match the base checkpoint {base.description}")
    tproblems = []
    for name, shape in names.items():
        if tuned.resolve(name) is None:
            tproblems.append(f"tuned checkpoint has no tensor {name}")
        elif tuple(tuned.shape(name)) != tuple(shape):
            tproblems.append(f"{name}: base has shape {list(shape)}, tuned checkpoint has {list(tuned.shape(name))}")
    if tproblems:
        shown = "\n  - ".join(tproblems[:20])
        more = f"\n  ... and {len(tproblems) - 20} more" if len(tproblems) > 20 else ""
        raise DataError(
            f"the tuned checkpoint {tuned.description} does not hold the unit-bearing tensors of the base "
            f"({len(tproblems)} problem(s)):\n  - {shown}{more}\n"
            "Fix: pass the full fine-tuned model folder (for a LoRA adapter, the adapter folder with --base), "
            "saved with save_pretrained; a different model's checkpoint cannot be verified against this mask"
        )


def _check_fingerprint(mask: Mask, base: TensorSource) -> None:
    """The base checkpoint holds the weights the mask was made from (the check of ``Mask.validate``, on disk)."""
    differ = fingerprint_mismatches(mask.fingerprint,
                                    lambda name: base.get(name) if base.resolve(name) is not None else None)
    if differ:
        raise MaskMismatchError(
            [f"{len(differ)} of {len(mask.fingerprint)} unit-bearing tensors of the base differ from the mask's "
             f"fingerprint (first: {differ[0]}): the base is not the model the mask was made from. Pass the base "
             "the mask was located on, or check_fingerprint=False (--no-fingerprint-check) if you mean it"],
            context=f"the mask does not match the base checkpoint {base.description}",
        )


# ---------------------------------------------------------------------------------------------------- public
def verify_checkpoint(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    mask: str | os.PathLike | Mask,
    policy: str | None = None,
    tolerance: float = 0.0,
    *,
    check_fingerprint: bool = True,
    progress: bool = True,
) -> VerifyReport:
    """Compare the frozen units of ``mask`` between the ``base`` and ``tuned`` checkpoints.

    Args:
        base: the model the mask was made for: a ``save_pretrained`` folder (sharded or not) or a ``.safetensors``
            file.
        tuned: the fine-tuned checkpoint, same forms, or a PEFT adapter folder (merged into ``base`` first).
        mask: a mask file or :class:`~ssah_plugin.Mask`.
        policy: which units were frozen (default: the mask's default policy).
        tolerance: largest absolute drift accepted on a frozen unit (default 0.0: bit-exact up to ``-0.0 == 0.0``).
        check_fingerprint: refuse a base whose weights differ from those the mask was made from.
        progress: progress bar over tensors.

    Raises:
        MaskFormatError / MaskMismatchError / DataError: unreadable mask, mask for another model, missing tensors,
            unreadable checkpoint (all :class:`~ssah_plugin.SSAHError`; the CLI maps them to exit code 2).
    """
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance >= 0 \
            or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    mask = mask if isinstance(mask, Mask) else Mask.load(mask)
    policy = policy or mask.default_policy
    frozen_sets = mask.frozen(policy)
    base_src = open_checkpoint(base)
    tuned_src = open_checkpoint(tuned, base=base)
    names: dict[str, tuple] = {}
    for g in mask.groups:
        for s in g.slices:
            names.setdefault(s.name, tuple(s.shape))
    _check_inputs(mask, base_src, tuned_src, names)
    if check_fingerprint and mask.fingerprint:
        _check_fingerprint(mask, base_src)
    if not any(bool(f.any()) for f in frozen_sets):
        warnings.warn(f"policy {policy!r} freezes no unit of this mask: there is nothing to verify", stacklevel=2)

    casts: list[dict] = []
    drift = [torch.zeros(g.n_units, dtype=torch.float64) for g in mask.groups]
    jobs = [(gi, s) for gi, g in enumerate(mask.groups) for s in g.slices]
    cache: dict[tuple[str, int], torch.Tensor] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="verify", unit="slice", leave=False)
    for gi, s in jobs:
        key = (s.name, s.axis)
        if key not in cache:
            cache.clear()  # one tensor's per-channel drift in memory at a time (slices are grouped by tensor)
            cache[key] = _channel_drift(base_src, tuned_src, s.name, s.axis, tuple(s.shape), casts)
        per_unit = cache[key][s.index].amax(dim=1) if s.index.numel() else torch.zeros(s.index.shape[0],
                                                                                         dtype=torch.float64)
        drift[gi] = torch.maximum(drift[gi], per_unit)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seen = set()
    casts = [c for c in casts if not (c["tensor"] in seen or seen.add(c["tensor"]))]
    if casts:
        warnings.warn(f"{len(casts)} tensor(s) are stored in different dtypes ({casts[0]['base_dtype']} base, "
                      f"{casts[0]['tuned_dtype']} tuned); they were compared after casting the base to the tuned "
                      "dtype", stacklevel=2)

    total = DriftStats()
    per_layer: dict[int, DriftStats] = {}
    per_group: dict[str, DriftStats] = {}
    per_class: dict[str, DriftStats] | None = {} if mask.classes is not None else None
    for gi, g in enumerate(mask.groups):
        f, d = frozen_sets[gi], drift[gi]
        total.add(f, d, tolerance)
        per_layer.setdefault(g.layer, DriftStats()).add(f, d, tolerance)
        per_group.setdefault(g.name, DriftStats()).add(f, d, tolerance)
        if per_class is not None:
            codes = mask.classes[gi].to(torch.int64)
            for code in torch.unique(codes).tolist():
                sel = codes == code
                per_class.setdefault(CLASS_NAMES.get(code, str(code)), DriftStats()).add(f[sel], d[sel], tolerance)
    if per_class is not None:
        order = ["SCU", "CU", "UCU", "RU", "unknown"]
        per_class = dict(sorted(per_class.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
    report = VerifyReport(base=str(base), tuned=str(tuned), policy=policy, tolerance=float(tolerance), total=total,
                          per_class=per_class, per_layer=per_layer, per_group=per_group, tensors_checked=len(names),
                          dtype_casts=casts)
    logger.info("verify: %d frozen units, %d drifted beyond %g (max drift %.3g)", total.frozen_units,
                total.violating_units, tolerance, total.max_drift)
    for src in (base_src, tuned_src):
        src.close()
    return report
