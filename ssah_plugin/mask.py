"""The mask file: which units exist, what they scored, which are frozen (safetensors, versioned).

On-disk format, version 1 (pinned by ``tests/golden/mask_v1.safetensors``)
-------------------------------------------------------------------------
A safetensors file. Its string metadata holds:

=====================  ==============================================================================================
key                    value
=====================  ==============================================================================================
``format``             ``"ssah-mask"``
``format_version``     ``"1"``
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
=====================  ==============================================================================================

Tensors (``g`` is the group's position in ``groups``, ``s`` the slice's position in the group):

* ``g{g}.s{s}.index``: int32 ``[n_units, k]``: indices along ``axis`` of ``module.param`` owned by each unit.
* ``g{g}.score.{kind}``: float64 ``[n_units]``: per-unit scores (locate).
* ``g{g}.class``: uint8 ``[n_units]``: class label, see :data:`CLASS_NAMES` (255 = unknown).
* ``g{g}.frozen.{policy}``: uint8 ``[n_units]``: 1 where the unit is frozen under that stored policy.
* ``fingerprint.{i}``: float32 ``[32]``: fixed samples of the i-th distinct unit-bearing tensor (same order as
  first appearance in ``groups``), used to tell a mask made for other weights.
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

from ._version import __version__
from .errors import MaskFormatError, MaskMismatchError
from .units import Granularity, SliceMap, UnitGroup, describe_units, find_arch_spec, unwrap_model

__all__ = ["Mask", "CLASS_NAMES", "CLASS_CODES", "FORMAT_VERSION", "config_hash", "fingerprint_samples"]

FORMAT = "ssah-mask"
FORMAT_VERSION = 1
#: class code -> name; 255 means "not classified" (explicit masks).
CLASS_NAMES = {0: "RU", 1: "SCU", 2: "UCU", 3: "CU", 255: "unknown"}
CLASS_CODES = {v: k for k, v in CLASS_NAMES.items()}
_N_SAMPLES = 32
_CONFIG_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
)


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
    :mod:`ssah_plugin.policies`).
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
        return cls(
            groups=groups,
            architecture=model_type,
            model_class=type(root).__name__,
            config_hash=config_hash(root),
            fingerprint=fp,
            granularity=granularity,
        )

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
                range(8)}``. Group names are those of :func:`ssah_plugin.units.describe_units`.
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
            idx = torch.as_tensor(list(units), dtype=torch.int64)
            n = mask.groups[by_name[name]].n_units
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
        """Names of the frozen sets stored in the file (computed policies are in :mod:`ssah_plugin.policies`)."""
        return list(self.stored)

    def frozen(self, policy: str | None = None) -> list[torch.Tensor]:
        """Per-group boolean tensors, True where the unit is frozen under ``policy`` (default: the file's)."""
        from .policies import resolve_policy

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
        from .resolve import find_weight

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
    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask as a safetensors file (format version 1); returns the path."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        groups_meta = []
        for gi, g in enumerate(self.groups):
            slices = []
            for si, s in enumerate(g.slices):
                tensors[f"g{gi}.s{si}.index"] = s.index.to(torch.int32).contiguous()
                slices.append({"module": s.module, "param": s.param, "axis": s.axis, "role": s.role,
                               "shape": list(s.shape)})
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
        }
        path = Path(path)
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
        """Read a mask file; raise :class:`MaskFormatError` naming the problem for anything unreadable."""
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
                f"{str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}). "
                "It may be truncated or corrupt, or another file type; recreate it with `ssah-plugin locate`"
            ) from None
        if meta.get("format") != FORMAT:
            raise MaskFormatError(
                f"{str(path)!r} is a safetensors file but not an ssah-plugin mask (metadata format="
                f"{meta.get('format')!r}). Did you pass model weights instead of the mask?"
            )
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise MaskFormatError(
                f"{str(path)!r} has mask format version {version!r}; this ssah-plugin {__version__} reads version "
                f"{FORMAT_VERSION}. Upgrade ssah-plugin (pip install -U ssah-plugin) or re-create the mask"
            )
        try:
            groups_meta = json.loads(meta["groups"])
            groups = []
            for gi, gm in enumerate(groups_meta):
                g = UnitGroup(gm["name"], gm["kind"], int(gm["layer"]), int(gm["n_units"]), gm["granularity"],
                              gm["score_module"], gm["score_layout"], int(gm["channels_per_unit"]))
                for si, sm in enumerate(gm["slices"]):
                    g.slices.append(SliceMap(sm["module"], sm["param"], int(sm["axis"]), sm["role"],
                                             tensors[f"g{gi}.s{si}.index"].to(torch.int64), tuple(sm["shape"])))
                groups.append(g)
            n = len(groups)
            scores = {k: [tensors[f"g{gi}.score.{k}"] for gi in range(n)] for k in json.loads(meta["score_names"])}
            classes = [tensors[f"g{gi}.class"] for gi in range(n)] if n and "g0.class" in tensors else None
            stored = {p: [tensors[f"g{gi}.frozen.{p}"].bool() for gi in range(n)] for p in json.loads(meta["policies"])}
            fp_names = json.loads(meta["fingerprint_tensors"])
            fingerprint = {name: tensors[f"fingerprint.{i}"] for i, name in enumerate(fp_names)}
            mask = cls(groups=groups, architecture=meta["architecture"], model_class=meta["model_class"],
                       config_hash=meta["config_hash"], fingerprint=fingerprint, scores=scores, classes=classes,
                       stored=stored, default_policy=meta["default_policy"], method=json.loads(meta["method"]),
                       granularity=meta["granularity"], library_version=meta["library_version"])
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise MaskFormatError(
                f"{str(path)!r} is an ssah-plugin mask with inconsistent contents ({type(exc).__name__}: {exc}); "
                "the file is damaged: re-create it"
            ) from None
        for gi, g in enumerate(mask.groups):
            bad = [k for k, v in mask.scores.items() if v[gi].shape != (g.n_units,)]
            bad += [p for p, v in mask.stored.items() if v[gi].shape != (g.n_units,)]
            if mask.classes is not None and mask.classes[gi].shape != (g.n_units,):
                bad.append("class")
            if bad:
                raise MaskFormatError(f"{str(path)!r}: group {g.name} has {g.n_units} units but {bad} disagree; "
                                      "the file is damaged: re-create it")
        return mask

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
