"""The in-memory mask: which units exist, what they scored, which are frozen; built, queried and validated here.

The file format (safetensors, versioned, with its integrity checks) is :mod:`ssah_plugin.core.mask_format`;
which units a policy freezes is :mod:`ssah_plugin.core.policies`; the fingerprint that tells another model is
:mod:`ssah_plugin.core.fingerprint`; the per-unit digests of the base values are :mod:`ssah_plugin.core.digest`.
``CLASS_NAMES``, ``CLASS_CODES``, ``FORMAT_VERSION``, ``config_hash``, ``fingerprint_samples`` and
``payload_checksum`` are re-exported from those modules.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ssah_plugin._version import __version__
from ssah_plugin.core.classes import CLASS_CODES, CLASS_NAMES
from ssah_plugin.core.digest import DIGEST_DTYPES, record_digests
from ssah_plugin.core.fingerprint import config_hash, fingerprint_mismatches, fingerprint_samples
from ssah_plugin.core.hub import HubMixin
from ssah_plugin.core.mask_format import FORMAT_VERSION, payload_checksum, read_mask_file, serialize, write_mask_file
from ssah_plugin.core.peft_layout import find_weight
from ssah_plugin.core.policies import resolve_policy
from ssah_plugin.core.unit_lists import frozen_sets_from_units
from ssah_plugin.core.units import (
    Granularity,
    SliceMap,
    UnitGroup,
    describe_units,
    find_arch_spec,
    unwrap_model,
)
from ssah_plugin.errors import MaskMismatchError

__all__ = ["Mask", "CLASS_NAMES", "CLASS_CODES", "FORMAT_VERSION", "config_hash", "fingerprint_samples",
           "payload_checksum"]


@dataclass
class Mask(HubMixin):
    """An in-memory mask: unit groups, optional scores and classes, and stored frozen sets ("policies").

    Build one from explicit unit lists with :meth:`from_units`, from locate's output, or read one with
    :meth:`load`. Choose what to freeze with :meth:`frozen` (``policy`` names are listed in
    :mod:`ssah_plugin.core.policies`).
    """

    groups: list[UnitGroup]
    architecture: str
    model_class: str
    config_hash: str
    fingerprint: dict[str, torch.Tensor] = field(default_factory=dict)  # param name -> samples
    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # kind -> per group float64
    classes: list[torch.Tensor] | None = None  # per group uint8
    stored: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # policy -> per group bool
    default_policy: str = "explicit"
    method: dict = field(default_factory=lambda: {"name": "explicit"})
    granularity: Granularity = "channel"
    library_version: str = __version__
    #: dtype name -> per group -> per slice: uint8 ``[n_units, 8]`` digests of the base values (format v2)
    digests: dict[str, list[list[torch.Tensor]]] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty_for(cls, model: nn.Module, granularity: Granularity = "channel") -> "Mask":
        """A mask describing every unit of ``model`` with nothing frozen yet (fingerprint taken now)."""
        root = unwrap_model(model)
        model_type, _ = find_arch_spec(root)
        groups = describe_units(root, granularity)
        params = dict(root.named_parameters())
        fp: dict[str, torch.Tensor] = {}
        for g in groups:
            for s in g.slices:
                if s.name not in fp and s.name in params:
                    fp[s.name] = fingerprint_samples(params[s.name])
        mask = cls(
            groups=groups,
            architecture=model_type,
            model_class=type(root).__name__,
            config_hash=config_hash(root),
            fingerprint=fp,
            granularity=granularity,
        )
        return mask.record_base(root)

    def record_base(self, source, dtypes: Iterable[str] | None = None, *, missing: str = "raise") -> "Mask":
        """Record the digests of every unit's base values (:mod:`ssah_plugin.core.digest`); returns ``self``.

        ``source`` is the base model (an ``nn.Module``) or a tensor source with ``get(name)`` such as
        :class:`ssah_plugin.io.checkpoint.SafetensorsCheckpoint` (reads one tensor at a time). Masks built by
        :meth:`from_units` and ``ssah-plugin locate`` record them already; call this to upgrade a version-1 mask::

            Mask.load("old.safetensors").record_base(base_model).save("mask.safetensors")

        ``missing="skip"`` leaves the mask without digests (instead of raising) when some weight cannot be read
        (a model on the meta device in layer-by-layer mode, a quantized base).
        """
        names = list(dtypes) if dtypes is not None else list(DIGEST_DTYPES)
        unknown = [d for d in names if d not in DIGEST_DTYPES]
        if unknown:
            raise ValueError(f"unknown digest dtype(s) {unknown}; choose from {list(DIGEST_DTYPES)}")
        if isinstance(source, nn.Module):
            root = unwrap_model(source)

            def get(s: SliceMap) -> torch.Tensor | None:
                return find_weight(root, s.module, s.param)
        else:
            def get(s: SliceMap) -> torch.Tensor | None:
                key = source.resolve(s.name) if hasattr(source, "resolve") else s.name
                return None if key is None else source.get(key)
        digests, problems = record_digests(self.groups, get, names)
        if problems and missing == "skip":
            return self
        if problems:
            raise MaskMismatchError([f"cannot read the base values of {n}" for n in problems],
                                    context="cannot record the base values of this mask")
        self.digests = digests
        return self

    @classmethod
    def from_units(
        cls,
        model: nn.Module,
        frozen: Mapping[str, Iterable[int]],
        *,
        granularity: Granularity = "channel",
        policy: str = "explicit",
    ) -> "Mask":
        """Build a mask that freezes explicit units.

        Args:
            model: the model the mask is for (its current weights are fingerprinted).
            frozen: group name -> unit indices, e.g. ``{"model.layers.0.mlp": [3, 17], "model.layers.1.self_attn":
                range(8)}``, or a boolean mask over the group's units (a bool tensor / array / list of exactly
                ``n_units`` entries, True = frozen). Group names are those of
                :func:`ssah_plugin.core.units.describe_units`. Non-integer indices (floats, ``1.5``) are refused.
            granularity: attention units per channel or per head.
            policy: name under which the frozen set is stored (and made the default).

        Example:
            >>> mask = Mask.from_units(model, {"model.layers.0.mlp": [0, 5]})  # doctest: +SKIP
            >>> mask.save("mask.safetensors")                                  # doctest: +SKIP
        """
        mask = cls.empty_for(model, granularity)
        sets, problems = frozen_sets_from_units(mask.groups, frozen)
        if problems:
            raise MaskMismatchError(problems, context="cannot build the mask from these unit lists")
        mask.stored[policy] = sets
        mask.default_policy = policy
        return mask

    # ------------------------------------------------------------------ queries
    @property
    def n_units(self) -> int:
        return sum(g.n_units for g in self.groups)

    @property
    def policies(self) -> list[str]:
        """Names of the frozen sets stored in the file (computed policies are in :mod:`ssah_plugin.core.policies`)."""
        return list(self.stored)

    def frozen(self, policy: str | None = None) -> list[torch.Tensor]:
        """Per-group boolean tensors, True where the unit is frozen under ``policy`` (default: the file's)."""
        return resolve_policy(self, policy or self.default_policy)

    def frozen_fraction(self, policy: str | None = None) -> float:
        sets = self.frozen(policy)
        return float(sum(int(s.sum()) for s in sets)) / max(self.n_units, 1)

    # ------------------------------------------------------------------ validation
    def validate(
        self,
        model: nn.Module,
        *,
        check_fingerprint: bool = True,
        get_tensor: Callable[[str, nn.Parameter], torch.Tensor | None] | None = None,
    ) -> None:
        """Check that this mask fits ``model``; raise one :class:`MaskMismatchError` listing every problem.

        Checks the architecture, that every unit-bearing parameter exists with the recorded shape, that every index
        is in range, and (``check_fingerprint``) that the weights are those the mask was made from, up to dtype
        rounding. ``get_tensor(name, param)`` returns the full tensor for fingerprinting (DeepSpeed ZeRO-3 gathers
        it); return ``None`` to skip a parameter.
        """
        root = unwrap_model(model)
        problems: list[str] = []
        model_type = getattr(getattr(root, "config", None), "model_type", None)
        if model_type != self.architecture:
            problems.append(f"mask was made for architecture {self.architecture!r}, model is {model_type!r}")
        seen: set[str] = set()
        for g in self.groups:
            for s in g.slices:
                if s.name in seen:
                    continue
                seen.add(s.name)
                param = find_weight(root, s.module, s.param)
                if param is None:
                    problems.append(f"missing parameter {s.name} (mask group {g.name})")
                    continue
                qshape = getattr(getattr(param, "quant_state", None), "shape", None)  # bitsandbytes 4-bit: packed
                shape = tuple(getattr(param, "ds_shape", None) or qshape or param.shape)
                if shape != tuple(s.shape):
                    problems.append(f"wrong shape for {s.name}: mask has {list(s.shape)}, model has {list(shape)}")
                    continue
        for g in self.groups:
            for s in g.slices:
                if s.axis >= len(s.shape):
                    problems.append(f"{s.name}: axis {s.axis} out of range for shape {list(s.shape)}")
                elif s.index.numel() and (int(s.index.max()) >= s.shape[s.axis] or int(s.index.min()) < 0):
                    problems.append(
                        f"{s.name}: index out of range along axis {s.axis} (size {s.shape[s.axis]}, "
                        f"max index {int(s.index.max())})"
                    )
                if s.index.shape[0] != g.n_units:
                    problems.append(f"{s.name}: index has {s.index.shape[0]} rows, group has {g.n_units} units")
        if check_fingerprint and self.fingerprint and not problems:
            def current(name: str) -> torch.Tensor | None:
                module, _, pname = name.rpartition(".")
                param = find_weight(root, module, pname)
                if param is None or getattr(param, "quant_state", None) is not None:
                    return None  # packed quantized weights (LoRA on a 4-bit base): samples are not comparable
                return get_tensor(name, param) if get_tensor is not None else param

            differ = fingerprint_mismatches(self.fingerprint, current)
            if differ:
                problems.append(
                    f"mask was made for other weights: {len(differ)} of {len(self.fingerprint)} unit-bearing tensors "
                    f"differ from the fingerprint (first: {differ[0]}). Pass check_fingerprint=False only if you "
                    "really mean to apply this mask to another checkpoint"
                )
        if problems:
            raise MaskMismatchError(problems, context=f"mask ({self.architecture}, {self.model_class}) does not match "
                                    f"{type(root).__name__}")

    # ------------------------------------------------------------------ persistence
    def _serialize(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata of the file (format version 2), checksum included."""
        return serialize(self)

    @property
    def checksum(self) -> str:
        """sha256 of the file this mask writes (:func:`payload_checksum`): equal masks, equal checksums."""
        return self._serialize()[1]["checksum"]

    def frozen_set_digest(self, policy: str | None = None) -> str:
        """sha256 of which units (and which weight slices) ``policy`` freezes: identifies a frozen set on resume."""
        h = hashlib.sha256()
        for g, frozen in zip(self.groups, self.frozen(policy)):
            units = frozen.nonzero().reshape(-1)
            if not units.numel():
                continue
            h.update(f"{g.name}:{g.n_units}".encode())
            h.update(units.to(torch.int64).numpy().tobytes())
            for s in g.slices:
                h.update(f"{s.name}:{s.axis}".encode())
                h.update(s.index[units].to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask as a safetensors file (format version 2, with its checksum); returns the path."""
        return write_mask_file(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mask":
        """Read a mask file; raise :class:`MaskFormatError` naming the problem for anything unreadable.

        Version 2 files are checked against their checksum before anything is parsed, so a damaged file (bit flips,
        truncation, edited header) is an error, never a different mask. Version 1 files (no checksum) are read with
        the same strict checks of every field's type and shape (:mod:`ssah_plugin.core.mask_format`).
        """
        return cls(**read_mask_file(path))

    def summary(self, policy: str | None = None) -> dict:
        """Counts for humans and logs: units, frozen units and fraction, per-class counts when classified."""
        sets = self.frozen(policy)
        out = {
            "architecture": self.architecture,
            "groups": len(self.groups),
            "units": self.n_units,
            "policy": policy or self.default_policy,
            "frozen_units": int(sum(int(s.sum()) for s in sets)),
        }
        out["frozen_fraction"] = out["frozen_units"] / max(self.n_units, 1)
        if self.classes is not None:
            allc = torch.cat([c.to(torch.int64) for c in self.classes])
            out["classes"] = {CLASS_NAMES[k]: int((allc == k).sum()) for k in (1, 2, 3, 0)}
        return out
