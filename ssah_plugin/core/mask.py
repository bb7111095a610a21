"""The mask file: which units exist, what they scored, which are frozen (safetensors, versioned).

On-disk format, version 2 (pinned by ``tests/golden/mask_v2.safetensors``; version 1, pinned by
``tests/golden/mask_v1.safetensors``, is still read)
------------------------------------------------------------------------------------------------------------------
A safetensors file. Its string metadata holds:

=====================  ==============================================================================================
key                    value
=====================  ==============================================================================================
``format``             ``"ssah-mask"``
``format_version``     ``"2"`` (``"1"``: no digests, no checksum)
``library_version``    version of ssah-plugin that wrote the file
``architecture``       ``config.model_type`` (e.g. ``"llama"``)
``model_class``        class name of the model the mask was built on
``config_hash``        sha256 of the structural config fields (:func:`config_hash`)
``base_fingerprint``   sha256 of the fingerprint sample tensors (display only; comparison uses the samples)
``method``             JSON: how the mask was made (``{"name": "explicit"}`` or locate's method and parameters)
``granularity``        ``"channel"`` or ``"head"`` (attention units)
``groups``             JSON list, one entry per unit group: ``name, kind, layer, n_units, granularity,
                       score_module, score_layout, channels_per_unit`` and ``slices``: a list of
                       ``{module, param, axis, role, shape}``
``policies``           JSON list of the frozen sets stored in the file (e.g. ``["explicit"]``)
``default_policy``     the policy used when the trainer does not name one
``score_names``        JSON list of score kinds stored (e.g. ``["safety", "utility", "safety_z", "utility_z"]``)
``digest_dtypes``      (v2) JSON list of the dtypes base-value digests are stored for (``[]``: none recorded)
``digest_algorithm``   (v2) how the digests are computed (:mod:`ssah_plugin.core.digest`)
``checksum``           (v2) sha256 of the payload: every other metadata entry and every tensor (name, dtype, shape,
                       bytes), see :func:`payload_checksum`; verified on load, so a damaged file is an error
=====================  ==============================================================================================

Tensors (``g`` is the group's position in ``groups``, ``s`` the slice's position in the group):

* ``g{g}.s{s}.index``: int32 ``[n_units, k]``: indices along ``axis`` of ``module.param`` owned by each unit.
* ``g{g}.score.{kind}``: float64 ``[n_units]``: per-unit scores (locate).
* ``g{g}.class``: uint8 ``[n_units]``: class label, see :data:`CLASS_NAMES` (255 = unknown).
* ``g{g}.frozen.{policy}``: uint8 ``[n_units]``: 1 where the unit is frozen under that stored policy.
* ``fingerprint.{i}``: float32 ``[32]``: fixed samples of the i-th distinct unit-bearing tensor (same order as
  first appearance in ``groups``), used to tell a mask made for other weights.
* ``g{g}.s{s}.digest.{dtype}`` (v2): uint8 ``[n_units, 8]``: digest of each unit's base values in that slice, cast
  to ``dtype`` (:mod:`ssah_plugin.core.digest`). Checked when training starts, so the frozen values held are exactly the
  base's (resume from a checkpoint trained without the mask, a wider policy, a replaced unit: all refused).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ssah_plugin._version import __version__
from ssah_plugin.core.units import (
    Granularity,
    SliceMap,
    UnitGroup,
    describe_units,
    find_arch_spec,
    unwrap_model,
)
from ssah_plugin.errors import MaskFormatError, MaskMismatchError

__all__ = ["Mask", "CLASS_NAMES", "CLASS_CODES", "FORMAT_VERSION", "config_hash", "fingerprint_samples",
           "payload_checksum"]

FORMAT = "ssah-mask"
FORMAT_VERSION = 2
#: versions this release reads
READABLE_VERSIONS = ("1", "2")
#: class code -> name; 255 means "not classified" (explicit masks).
CLASS_NAMES = {0: "RU", 1: "SCU", 2: "UCU", 3: "CU", 255: "unknown"}
CLASS_CODES = {v: k for k, v in CLASS_NAMES.items()}
_N_SAMPLES = 32
_CONFIG_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
)


def _unit_indices(units, n: int) -> tuple[torch.Tensor, str]:
    """Unit indices from a list / range / tensor / array of ints, or from a boolean mask of length ``n``.

    Returns ``(indices, "")`` or ``(empty, reason)``; booleans are never read as the indices 0 and 1.
    """
    empty = torch.zeros(0, dtype=torch.int64)
    if isinstance(units, torch.Tensor):
        t = units.detach().cpu().reshape(-1)
    else:
        try:
            import numpy as np

            if isinstance(units, np.ndarray):
                t = torch.from_numpy(units.copy()).reshape(-1) if units.dtype != object else None
            else:
                t = None
        except ImportError:  # pragma: no cover - numpy comes with torch
            t = None
        if t is None:
            items = list(units)
            if items and all(isinstance(u, bool) or type(u).__name__ == "bool_" for u in items):
                t = torch.tensor([bool(u) for u in items], dtype=torch.bool)
            else:
                bad = [u for u in items if isinstance(u, bool) or not _is_int(u)]
                if bad:
                    return empty, (f"unit indices must be integers, got {bad[:3]!r} (pass a list of int indices, or a "
                                   f"boolean mask of all {n} units)")
                t = torch.tensor([int(u) for u in items], dtype=torch.int64)
    if t.dtype == torch.bool:
        if t.numel() != n:
            return empty, (f"a boolean mask must have one entry per unit ({n}), got {t.numel()}; or pass integer "
                           "indices")
        return t.nonzero().reshape(-1), ""
    if t.is_floating_point() or t.is_complex():
        return empty, (f"unit indices must be integers, got a {t.dtype} tensor (pass integer indices, or a boolean "
                       f"mask of all {n} units)")
    return t.to(torch.int64), ""


def _is_int(u) -> bool:
    import numbers

    return isinstance(u, numbers.Integral)


def config_hash(model: nn.Module) -> str:
    """sha256 over the structural fields of the model's (text) config: equal configs give equal hashes."""
    root = unwrap_model(model)
    cfg = root.config
    get = getattr(cfg, "get_text_config", None)
    text = get() if callable(get) else cfg
    fields = {k: getattr(text, k, None) for k in _CONFIG_FIELDS}
    fields["model_type"] = getattr(cfg, "model_type", None)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_samples(tensor: torch.Tensor) -> torch.Tensor:
    """32 deterministic samples of a tensor's flattened values, as float32 (cheap; no full copy)."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    pos = torch.linspace(0, max(n - 1, 0), _N_SAMPLES).round().to(torch.int64).to(flat.device)
    return flat[pos].to(torch.float32).cpu()


#: Minimum cosine similarity between a tensor's recorded samples and the live ones. Unrelated weights give a cosine
#: near 0 (about +-0.2 for 32 samples); the same weights in bf16, or after fine-tuning that keeps them recognisable
#: (resumed checkpoints, typical learning rates), stay far above 0.5.
FINGERPRINT_MIN_COSINE = 0.5


def _samples_match(ref: torch.Tensor, cur: torch.Tensor) -> bool:
    """Same weights up to dtype rounding or fine-tuning: cosine similarity of the samples above the threshold.

    A reference that is all zeros (e.g. biases of a freshly initialised model) carries no information and always
    matches: after a few steps of training it is no longer zero, and that must not read as "other weights".
    """
    a, b = ref.double(), cur.double()
    na, nb = a.norm(), b.norm()
    if na == 0:
        return True
    if nb == 0 or not torch.isfinite(nb):
        return False
    return bool((a @ b) / (na * nb) > FINGERPRINT_MIN_COSINE)


@dataclass
class Mask:
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
        from ssah_plugin.core.digest import DIGEST_DTYPES, unit_digests, unit_values
        from ssah_plugin.core.plan import find_weight

        names = list(dtypes) if dtypes is not None else list(DIGEST_DTYPES)
        unknown = [d for d in names if d not in DIGEST_DTYPES]
        if unknown:
            raise ValueError(f"unknown digest dtype(s) {unknown}; choose from {list(DIGEST_DTYPES)}")
        if isinstance(source, nn.Module):
            root = unwrap_model(source)

            def get(s):
                return find_weight(root, s.module, s.param)
        else:
            def get(s):
                key = source.resolve(s.name) if hasattr(source, "resolve") else s.name
                return None if key is None else source.get(key)
        out: dict[str, list[list[torch.Tensor]]] = {d: [] for d in names}
        problems = []
        cache: dict[str, torch.Tensor | None] = {}
        for g in self.groups:
            per = {d: [] for d in names}
            for s in g.slices:
                if s.name not in cache:
                    cache.clear()  # slices of one tensor are adjacent; keep one tensor in memory at a time
                    t = get(s)
                    cache[s.name] = None if t is None or getattr(t, "quant_state", None) is not None or \
                        getattr(t, "ds_shape", None) is not None or t.device.type == "meta" else t.detach()
                t = cache[s.name]
                if t is None or tuple(t.shape) != tuple(s.shape) or not t.is_floating_point():
                    problems.append(s.name)
                    continue
                vals = unit_values(t, s.axis, s.index)
                for d in names:
                    per[d].append(unit_digests(vals, DIGEST_DTYPES[d]))
            for d in names:
                out[d].append(per[d])
        if problems and missing == "skip":
            return self
        if problems:
            raise MaskMismatchError([f"cannot read the base values of {n}" for n in problems],
                                    context="cannot record the base values of this mask")
        self.digests = out
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
        by_name = {g.name: i for i, g in enumerate(mask.groups)}
        sets = [torch.zeros(g.n_units, dtype=torch.bool) for g in mask.groups]
        problems = []
        for name, units in frozen.items():
            if name not in by_name:
                problems.append(f"unknown unit group {name!r} (first groups: {', '.join(list(by_name)[:4])}, ...)")
                continue
            n = mask.groups[by_name[name]].n_units
            idx, why = _unit_indices(units, n)
            if why:
                problems.append(f"{name}: {why}")
                continue
            if idx.numel() and (idx.min() < 0 or idx.max() >= n):
                problems.append(f"{name}: unit index out of range [0, {n}): {idx[(idx < 0) | (idx >= n)][:5].tolist()}")
                continue
            sets[by_name[name]][idx] = True
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
        from ssah_plugin.core.policies import resolve_policy

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
        from ssah_plugin.core.plan import find_weight

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
            differ = []
            for name, ref in self.fingerprint.items():
                module, _, pname = name.rpartition(".")
                param = find_weight(root, module, pname)
                if param is None:
                    continue
                if getattr(param, "quant_state", None) is not None:
                    continue  # packed quantized weights (LoRA on a 4-bit base): samples are not comparable
                full = get_tensor(name, param) if get_tensor is not None else param
                if full is None:
                    continue
                if not _samples_match(ref, fingerprint_samples(full)):
                    differ.append(name)
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
        from ssah_plugin.core.digest import DIGEST_ALGORITHM

        tensors: dict[str, torch.Tensor] = {}
        groups_meta = []
        for gi, g in enumerate(self.groups):
            slices = []
            for si, s in enumerate(g.slices):
                tensors[f"g{gi}.s{si}.index"] = s.index.to(torch.int32).contiguous()
                slices.append({"module": s.module, "param": s.param, "axis": s.axis, "role": s.role,
                               "shape": list(s.shape)})
                for d, per_group in self.digests.items():
                    tensors[f"g{gi}.s{si}.digest.{d}"] = per_group[gi][si].to(torch.uint8).contiguous()
            groups_meta.append({
                "name": g.name, "kind": g.kind, "layer": g.layer, "n_units": g.n_units,
                "granularity": g.granularity, "score_module": g.score_module, "score_layout": g.score_layout,
                "channels_per_unit": g.channels_per_unit, "slices": slices,
            })
            for kind, per_group in self.scores.items():
                tensors[f"g{gi}.score.{kind}"] = per_group[gi].to(torch.float64).contiguous()
            if self.classes is not None:
                tensors[f"g{gi}.class"] = self.classes[gi].to(torch.uint8).contiguous()
            for pol, per_group in self.stored.items():
                tensors[f"g{gi}.frozen.{pol}"] = per_group[gi].to(torch.uint8).contiguous()
        fp_names = list(self.fingerprint)
        for i, name in enumerate(fp_names):
            tensors[f"fingerprint.{i}"] = self.fingerprint[name].to(torch.float32).contiguous()
        fp_hash = hashlib.sha256(b"".join(self.fingerprint[n].numpy().tobytes() for n in fp_names)).hexdigest()
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "library_version": self.library_version,
            "architecture": self.architecture,
            "model_class": self.model_class,
            "config_hash": self.config_hash,
            "base_fingerprint": fp_hash,
            "fingerprint_tensors": json.dumps(fp_names),
            "method": json.dumps(self.method, sort_keys=True),
            "granularity": self.granularity,
            "groups": json.dumps(groups_meta),
            "policies": json.dumps(list(self.stored)),
            "default_policy": self.default_policy,
            "score_names": json.dumps(list(self.scores)),
            "digest_dtypes": json.dumps(list(self.digests)),
            "digest_algorithm": DIGEST_ALGORITHM,
        }
        meta["checksum"] = payload_checksum(meta, tensors)
        return tensors, meta

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
        from safetensors.torch import save_file

        tensors, meta = self._serialize()
        path = Path(path)
        if path.is_dir():
            raise MaskFormatError(f"{str(path)!r} is a directory; pass a file name such as {str(path / 'mask.safetensors')!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary file (safetensors creates it private)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Mask":
        """Read a mask file; raise :class:`MaskFormatError` naming the problem for anything unreadable.

        Version 2 files are checked against their checksum before anything is parsed, so a damaged file (bit flips,
        truncation, edited header) is an error, never a different mask. Version 1 files (no checksum) are read with
        the same strict checks of every field's type and shape.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MaskFormatError(f"mask file {str(path)!r} does not exist. Create one with `ssah-plugin locate` "
                                  "or ssah_plugin.Mask.from_units(...).save(path)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for bad headers / truncation
            raise MaskFormatError(
                f"{str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {str(exc)[:200]}). "
                "It may be truncated or corrupt, or another file type; recreate it with `ssah-plugin locate`"
            ) from None
        if meta.get("format") != FORMAT:
            raise MaskFormatError(
                f"{str(path)!r} is a safetensors file but not an ssah-plugin mask (metadata format="
                f"{str(meta.get('format'))[:40]!r}). Did you pass model weights instead of the mask?"
            )
        version = meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise MaskFormatError(
                f"{str(path)!r} has mask format version {str(version)[:20]!r}; this ssah-plugin {__version__} reads "
                f"versions {', '.join(READABLE_VERSIONS)}. Upgrade ssah-plugin (pip install -U ssah-plugin) or "
                "re-create the mask"
            )
        damaged = f"{str(path)!r}: the mask file is damaged"
        if "checksum" in meta or version != "1":
            want = meta.get("checksum")
            if want is None:
                raise MaskFormatError(f"{damaged} (a version {version} mask without its checksum); re-create it with "
                                      "`ssah-plugin locate` or Mask.from_units(...).save()")
            rest = {k: v for k, v in meta.items() if k != "checksum"}
            if payload_checksum(rest, tensors) != want:
                raise MaskFormatError(f"{damaged}: its contents do not match the checksum it was written with "
                                      "(corrupted in storage or transfer, or edited). Re-create it, or copy it again "
                                      "from where it was made")
        try:
            mask = cls._parse(meta, tensors)
        except _Bad as exc:
            raise MaskFormatError(f"{damaged}: {exc}; re-create it") from None
        except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError,
                json.JSONDecodeError) as exc:
            raise MaskFormatError(
                f"{damaged}: inconsistent contents ({type(exc).__name__}: {str(exc)[:200]}); re-create it"
            ) from None
        return mask

    @classmethod
    def _parse(cls, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> "Mask":
        """Build a mask from a file's metadata and tensors, checking every field's type and every tensor's shape."""
        def js(key: str, kind: type):
            v = json.loads(_need(meta, key))
            if not isinstance(v, kind):
                raise _Bad(f"metadata {key!r} is not a JSON {kind.__name__}")
            return v

        def tensor(key: str, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
            if key not in tensors:
                raise _Bad(f"tensor {key!r} is missing")
            t = tensors[key]
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise _Bad(f"tensor {key!r} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
            return t

        groups_meta = js("groups", list)
        groups = []
        for gi, gm in enumerate(groups_meta):
            if not isinstance(gm, dict):
                raise _Bad(f"group {gi} is not a JSON object")
            n = _int(gm, "n_units", f"group {gi}")
            g = UnitGroup(_str(gm, "name", f"group {gi}"), _choice(gm, "kind", ("mlp", "attn"), f"group {gi}"),
                          _int(gm, "layer", f"group {gi}"), n,
                          _choice(gm, "granularity", ("channel", "head"), f"group {gi}"),
                          _str(gm, "score_module", f"group {gi}"),
                          _choice(gm, "score_layout", ("linear", "conv1d"), f"group {gi}"),
                          _int(gm, "channels_per_unit", f"group {gi}"))
            slices = gm.get("slices")
            if not isinstance(slices, list):
                raise _Bad(f"group {gi}: 'slices' is not a list")
            for si, sm in enumerate(slices):
                where = f"group {gi} slice {si}"
                if not isinstance(sm, dict):
                    raise _Bad(f"{where} is not a JSON object")
                shape = sm.get("shape")
                if not isinstance(shape, list) or not shape or not all(_is_count(d) for d in shape):
                    raise _Bad(f"{where}: 'shape' must be a list of non-negative integers, got {str(shape)[:40]}")
                axis = _int(sm, "axis", where)
                if axis >= len(shape):
                    raise _Bad(f"{where}: axis {axis} out of range for shape {shape}")
                key = f"g{gi}.s{si}.index"
                idx = tensors.get(key)
                if idx is None or idx.dtype != torch.int32 or idx.dim() != 2 or idx.shape[0] != n:
                    raise _Bad(f"tensor {key!r} must be int32 [n_units={n}, k]")
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= shape[axis]):
                    raise _Bad(f"tensor {key!r} holds indices outside [0, {shape[axis]})")
                g.slices.append(SliceMap(_str(sm, "module", where), _str(sm, "param", where), axis,
                                         _choice(sm, "role", ("in", "out"), where), idx.to(torch.int64), tuple(shape)))
            groups.append(g)
        n_groups = len(groups)
        score_names = js("score_names", list)
        policies = js("policies", list)
        fp_names = js("fingerprint_tensors", list)
        digest_dtypes = js("digest_dtypes", list) if "digest_dtypes" in meta else []
        from ssah_plugin.core.digest import DIGEST_BYTES, DIGEST_DTYPES

        for what, names in (("score_names", score_names), ("policies", policies), ("fingerprint_tensors", fp_names),
                            ("digest_dtypes", digest_dtypes)):
            if not all(isinstance(x, str) for x in names) or len(set(names)) != len(names):
                raise _Bad(f"metadata {what!r} must be a list of distinct strings")
        if any(d not in DIGEST_DTYPES for d in digest_dtypes):
            raise _Bad(f"unknown digest dtype in {digest_dtypes}")
        scores = {k: [tensor(f"g{gi}.score.{k}", torch.float64, (g.n_units,)) for gi, g in enumerate(groups)]
                  for k in score_names}
        classes = None
        if n_groups and "g0.class" in tensors:
            classes = [tensor(f"g{gi}.class", torch.uint8, (g.n_units,)) for gi, g in enumerate(groups)]
            if any(not bool(torch.isin(c, torch.tensor(sorted(CLASS_NAMES), dtype=torch.uint8)).all())
                   for c in classes):
                raise _Bad("a class tensor holds a code that is not a class")
        stored = {}
        for p in policies:
            sets = [tensor(f"g{gi}.frozen.{p}", torch.uint8, (g.n_units,)) for gi, g in enumerate(groups)]
            if any(bool((t > 1).any()) for t in sets):
                raise _Bad(f"frozen set {p!r} holds values other than 0 and 1")
            stored[p] = [t.bool() for t in sets]
        fingerprint = {name: tensor(f"fingerprint.{i}", torch.float32, (_N_SAMPLES,)) for i, name in enumerate(fp_names)}
        digests = {d: [[tensor(f"g{gi}.s{si}.digest.{d}", torch.uint8, (g.n_units, DIGEST_BYTES))
                        for si in range(len(g.slices))] for gi, g in enumerate(groups)] for d in digest_dtypes}
        method = json.loads(_need(meta, "method"))
        if not isinstance(method, dict):
            raise _Bad("metadata 'method' is not a JSON object")
        granularity = _need(meta, "granularity")
        if granularity not in ("channel", "head"):
            raise _Bad(f"granularity {granularity[:20]!r} is neither 'channel' nor 'head'")
        return cls(groups=groups, architecture=_need(meta, "architecture"), model_class=_need(meta, "model_class"),
                   config_hash=_need(meta, "config_hash"), fingerprint=fingerprint, scores=scores, classes=classes,
                   stored=stored, default_policy=_need(meta, "default_policy"), method=method,
                   granularity=granularity, library_version=_need(meta, "library_version"),  # type: ignore[arg-type]
                   digests=digests)

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


class _Bad(Exception):
    """A field of a mask file with the wrong type, shape or value (turned into a MaskFormatError by load)."""


def _need(meta: dict, key: str) -> str:
    if key not in meta:
        raise _Bad(f"metadata {key!r} is missing")
    return meta[key]


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _int(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    if not _is_count(v):
        raise _Bad(f"{where}: {key!r} must be a non-negative integer, got {str(v)[:40]!r}")
    return v


def _str(d: dict, key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise _Bad(f"{where}: {key!r} must be a string")
    return v


def _choice(d: dict, key: str, allowed: tuple, where: str) -> str:
    v = d.get(key)
    if v not in allowed:
        raise _Bad(f"{where}: {key!r} must be one of {list(allowed)}, got {str(v)[:40]!r}")
    return v


def payload_checksum(meta: dict[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a mask file's payload: the metadata (minus ``checksum``) and every tensor's name, dtype, shape, bytes.

    Independent of the safetensors layout (header order, padding), so a file re-written with the same contents has
    the same checksum.
    """
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
