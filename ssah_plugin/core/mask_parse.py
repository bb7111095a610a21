"""Parsing a mask file's fields, with a strict check of every field's type and every tensor's dtype and shape.

The format is described in :mod:`ssah_plugin.core.mask_format`; this is its reading half after the integrity checks
(checksum, format version), shared by every format version this release reads.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from ssah_plugin.core.classes import CLASS_NAMES
from ssah_plugin.core.digest import DIGEST_BYTES, DIGEST_DTYPES
from ssah_plugin.core.fingerprint import N_SAMPLES
from ssah_plugin.core.units import SliceMap, UnitGroup

__all__ = ["MaskFieldError", "parse_fields"]


class MaskFieldError(Exception):
    """A field of a mask file with the wrong type, shape or value (turned into a MaskFormatError by the reader)."""


def parse_fields(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The :class:`~ssah_plugin.core.mask.Mask` fields (keyword arguments) of a mask file's metadata and tensors.

    Checks every field's type and every tensor's dtype and shape; raises :class:`MaskFieldError` for the first
    field that is wrong (:func:`ssah_plugin.core.mask_format.read_mask_file` turns it into a ``MaskFormatError``).
    """
    def js(key: str, kind: type):
        v = json.loads(_need(meta, key))
        if not isinstance(v, kind):
            raise MaskFieldError(f"metadata {key!r} is not a JSON {kind.__name__}")
        return v

    def tensor(key: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        if key not in tensors:
            raise MaskFieldError(f"tensor {key!r} is missing")
        t = tensors[key]
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise MaskFieldError(f"tensor {key!r} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
        return t

    groups_meta = js("groups", list)
    groups = []
    for gi, gm in enumerate(groups_meta):
        if not isinstance(gm, dict):
            raise MaskFieldError(f"group {gi} is not a JSON object")
        n = _int(gm, "n_units", f"group {gi}")
        g = UnitGroup(_str(gm, "name", f"group {gi}"), _choice(gm, "kind", ("mlp", "attn"), f"group {gi}"),
                      _int(gm, "layer", f"group {gi}"), n,
                      _choice(gm, "granularity", ("channel", "head"), f"group {gi}"),
                      _str(gm, "score_module", f"group {gi}"),
                      _choice(gm, "score_layout", ("linear", "conv1d"), f"group {gi}"),
                      _int(gm, "channels_per_unit", f"group {gi}"))
        slices = gm.get("slices")
        if not isinstance(slices, list):
            raise MaskFieldError(f"group {gi}: 'slices' is not a list")
        for si, sm in enumerate(slices):
            where = f"group {gi} slice {si}"
            if not isinstance(sm, dict):
                raise MaskFieldError(f"{where} is not a JSON object")
            shape = sm.get("shape")
            if not isinstance(shape, list) or not shape or not all(_is_count(d) for d in shape):
                raise MaskFieldError(f"{where}: 'shape' must be a list of non-negative integers, got {str(shape)[:40]}")
            axis = _int(sm, "axis", where)
            if axis >= len(shape):
                raise MaskFieldError(f"{where}: axis {axis} out of range for shape {shape}")
            key = f"g{gi}.s{si}.index"
            idx = tensors.get(key)
            if idx is None or idx.dtype != torch.int32 or idx.dim() != 2 or idx.shape[0] != n:
                raise MaskFieldError(f"tensor {key!r} must be int32 [n_units={n}, k]")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= shape[axis]):
                raise MaskFieldError(f"tensor {key!r} holds indices outside [0, {shape[axis]})")
            g.slices.append(SliceMap(_str(sm, "module", where), _str(sm, "param", where), axis,
                                     _choice(sm, "role", ("in", "out"), where), idx.to(torch.int64), tuple(shape)))
        groups.append(g)
    n_groups = len(groups)
    score_names = js("score_names", list)
    policies = js("policies", list)
    fp_names = js("fingerprint_tensors", list)
    digest_dtypes = js("digest_dtypes", list) if "digest_dtypes" in meta else []
    for what, names in (("score_names", score_names), ("policies", policies), ("fingerprint_tensors", fp_names),
                        ("digest_dtypes", digest_dtypes)):
        if not all(isinstance(x, str) for x in names) or len(set(names)) != len(names):
            raise MaskFieldError(f"metadata {what!r} must be a list of distinct strings")
    if any(d not in DIGEST_DTYPES for d in digest_dtypes):
        raise MaskFieldError(f"unknown digest dtype in {digest_dtypes}")
    scores = {k: [tensor(f"g{gi}.score.{k}", torch.float64, (g.n_units,)) for gi, g in enumerate(groups)]
              for k in score_names}
    classes = None
    if n_groups and "g0.class" in tensors:
        classes = [tensor(f"g{gi}.class", torch.uint8, (g.n_units,)) for gi, g in enumerate(groups)]
        if any(not bool(torch.isin(c, torch.tensor(sorted(CLASS_NAMES), dtype=torch.uint8)).all())
               for c in classes):
            raise MaskFieldError("a class tensor holds a code that is not a class")
    stored = {}
    for p in policies:
        sets = [tensor(f"g{gi}.frozen.{p}", torch.uint8, (g.n_units,)) for gi, g in enumerate(groups)]
        if any(bool((t > 1).any()) for t in sets):
            raise MaskFieldError(f"frozen set {p!r} holds values other than 0 and 1")
        stored[p] = [t.bool() for t in sets]
    fingerprint = {name: tensor(f"fingerprint.{i}", torch.float32, (N_SAMPLES,)) for i, name in enumerate(fp_names)}
    digests = {d: [[tensor(f"g{gi}.s{si}.digest.{d}", torch.uint8, (g.n_units, DIGEST_BYTES))
                    for si in range(len(g.slices))] for gi, g in enumerate(groups)] for d in digest_dtypes}
    method = json.loads(_need(meta, "method"))
    if not isinstance(method, dict):
        raise MaskFieldError("metadata 'method' is not a JSON object")
    granularity = _need(meta, "granularity")
    if granularity not in ("channel", "head"):
        raise MaskFieldError(f"granularity {granularity[:20]!r} is neither 'channel' nor 'head'")
    return dict(groups=groups, architecture=_need(meta, "architecture"), model_class=_need(meta, "model_class"),
                config_hash=_need(meta, "config_hash"), fingerprint=fingerprint, scores=scores, classes=classes,
                stored=stored, default_policy=_need(meta, "default_policy"), method=method,
                granularity=granularity, library_version=_need(meta, "library_version"), digests=digests)


def _need(meta: dict, key: str) -> str:
    if key not in meta:
        raise MaskFieldError(f"metadata {key!r} is missing")
    return meta[key]


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _int(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    if not _is_count(v):
        raise MaskFieldError(f"{where}: {key!r} must be a non-negative integer, got {str(v)[:40]!r}")
    return v


def _str(d: dict, key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise MaskFieldError(f"{where}: {key!r} must be a string")
    return v


def _choice(d: dict, key: str, allowed: tuple, where: str) -> str:
    v = d.get(key)
    if v not in allowed:
        raise MaskFieldError(f"{where}: {key!r} must be one of {list(allowed)}, got {str(v)[:40]!r}")
    return v
