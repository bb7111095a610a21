"""The mask file format: reading (with its integrity checks) and writing (safetensors, versioned).

The in-memory mask is :class:`ssah_plugin.core.mask.Mask`; this module turns it into a file and back, and refuses
anything it cannot read exactly (:class:`~ssah_plugin.errors.MaskFormatError`).

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
* ``g{g}.class``: uint8 ``[n_units]``: class label, see :data:`ssah_plugin.core.classes.CLASS_NAMES` (255 = unknown).
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from safetensors.torch import save_file

from ssah_plugin._version import __version__
from ssah_plugin.core.digest import DIGEST_ALGORITHM
from ssah_plugin.core.mask_parse import MaskFieldError, parse_fields
from ssah_plugin.core.tensor_file import TensorFile, TensorFileError
from ssah_plugin.errors import MaskFormatError

if TYPE_CHECKING:  # pragma: no cover
    from ssah_plugin.core.mask import Mask

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "payload_checksum", "serialize", "write_mask_file",
           "read_mask_file"]

FORMAT = "ssah-mask"
FORMAT_VERSION = 2
#: versions this release reads
READABLE_VERSIONS = ("1", "2")


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


def serialize(mask: "Mask") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of ``mask``'s file (format version 2), checksum included."""
    tensors: dict[str, torch.Tensor] = {}
    groups_meta = []
    for gi, g in enumerate(mask.groups):
        slices = []
        for si, s in enumerate(g.slices):
            tensors[f"g{gi}.s{si}.index"] = s.index.to(torch.int32).contiguous()
            slices.append({"module": s.module, "param": s.param, "axis": s.axis, "role": s.role,
                           "shape": list(s.shape)})
            for d, per_group in mask.digests.items():
                tensors[f"g{gi}.s{si}.digest.{d}"] = per_group[gi][si].to(torch.uint8).contiguous()
        groups_meta.append({
            "name": g.name, "kind": g.kind, "layer": g.layer, "n_units": g.n_units,
            "granularity": g.granularity, "score_module": g.score_module, "score_layout": g.score_layout,
            "channels_per_unit": g.channels_per_unit, "slices": slices,
        })
        for kind, per_group in mask.scores.items():
            tensors[f"g{gi}.score.{kind}"] = per_group[gi].to(torch.float64).contiguous()
        if mask.classes is not None:
            tensors[f"g{gi}.class"] = mask.classes[gi].to(torch.uint8).contiguous()
        for pol, per_group in mask.stored.items():
            tensors[f"g{gi}.frozen.{pol}"] = per_group[gi].to(torch.uint8).contiguous()
    fp_names = list(mask.fingerprint)
    for i, name in enumerate(fp_names):
        tensors[f"fingerprint.{i}"] = mask.fingerprint[name].to(torch.float32).contiguous()
    fp_hash = hashlib.sha256(b"".join(mask.fingerprint[n].numpy().tobytes() for n in fp_names)).hexdigest()
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "library_version": mask.library_version,
        "architecture": mask.architecture,
        "model_class": mask.model_class,
        "config_hash": mask.config_hash,
        "base_fingerprint": fp_hash,
        "fingerprint_tensors": json.dumps(fp_names),
        "method": json.dumps(mask.method, sort_keys=True),
        "granularity": mask.granularity,
        "groups": json.dumps(groups_meta),
        "policies": json.dumps(list(mask.stored)),
        "default_policy": mask.default_policy,
        "score_names": json.dumps(list(mask.scores)),
        "digest_dtypes": json.dumps(list(mask.digests)),
        "digest_algorithm": DIGEST_ALGORITHM,
    }
    meta["checksum"] = payload_checksum(meta, tensors)
    return tensors, meta


def write_mask_file(mask: "Mask", path: str | os.PathLike) -> Path:
    """Write ``mask`` as a safetensors file (format version 2, with its checksum); returns the path.

    Written to ``<path>.tmp`` and renamed, so a reader never sees a half-written file.
    """
    tensors, meta = serialize(mask)
    path = Path(path)
    if path.is_dir():
        raise MaskFormatError(f"{str(path)!r} is a directory; pass a file name such as "
                              f"{str(path / 'mask.safetensors')!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # an ordinary file (safetensors creates it private)
    os.replace(tmp, path)
    return path


def read_mask_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a mask file into the fields of a :class:`~ssah_plugin.core.mask.Mask` (keyword arguments).

    Raises :class:`~ssah_plugin.errors.MaskFormatError` naming the problem for anything unreadable.

    Version 2 files are checked against their checksum before anything is parsed, so a damaged file (bit flips,
    truncation, edited header) is an error, never a different mask. Version 1 files (no checksum) are read with
    the same strict checks of every field's type and shape.
    """
    path = Path(path)
    if not path.is_file():
        raise MaskFormatError(f"mask file {str(path)!r} does not exist. Create one with `ssah-plugin locate` "
                              "or ssah_plugin.Mask.from_units(...).save(path)")
    try:
        file = TensorFile(path)
        meta, tensors = file.metadata(), file.read_all()
    except TensorFileError as exc:
        raise MaskFormatError(
            f"{str(path)!r} is not a readable safetensors file ({exc.reason}). "
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
        fields = parse_fields(meta, tensors)
    except MaskFieldError as exc:
        raise MaskFormatError(f"{damaged}: {exc}; re-create it") from None
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError,
            json.JSONDecodeError) as exc:
        raise MaskFormatError(
            f"{damaged}: inconsistent contents ({type(exc).__name__}: {str(exc)[:200]}); re-create it"
        ) from None
    return fields
