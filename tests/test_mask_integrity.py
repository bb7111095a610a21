"""A damaged mask file is an error, never another mask (issue 11, items 8 and 10).

Fuzz over a valid version-2 mask: single-bit flips anywhere in the file (header and data), truncations at many
lengths, and edits of the header JSON (types, values, offsets, the checksum itself). Every case must end in
:class:`MaskFormatError` or in a load identical to the original (compared field by field, not through the checksum).
Version-1 files (no checksum) get the same strict field checks for header edits.
"""
from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path

import pytest
import torch

from ssah_plugin.core.mask import Mask
from ssah_plugin.errors import MaskFormatError

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN_DIR))
from make_golden import GOLDEN, GOLDEN_V1  # noqa: E402


def _content(mask: Mask) -> tuple[dict, dict]:
    """Everything a mask holds, as the file would store it (minus the checksum, which is derived)."""
    tensors, meta = mask._serialize()
    meta = {k: v for k, v in meta.items() if k != "checksum"}
    return meta, tensors


def _same(a: Mask, b: Mask) -> bool:
    ma, ta = _content(a)
    mb, tb = _content(b)
    return ma == mb and set(ta) == set(tb) and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k])
                                                   for k in ta)


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _outcome(path: Path, original: Mask) -> str:
    """"error" (our error), "same" (identical load) or "DIFFERENT" (a damaged file read as another mask)."""
    try:
        loaded = Mask.load(path)
    except MaskFormatError:
        return "error"
    return "same" if _same(loaded, original) else "DIFFERENT"


@pytest.fixture(scope="module")
def original() -> tuple[bytes, Mask]:
    return GOLDEN.read_bytes(), Mask.load(GOLDEN)


def test_single_bit_flips_are_errors(original, tmp_path):
    data, mask = original
    n_header = 8 + struct.unpack("<Q", data[:8])[0]
    rng = random.Random(0)
    # every byte of the length prefix, then samples of the header and of each tensor's data
    header_bits = [(i, b) for i in range(8) for b in (0, 3, 7)]
    header_bits += [(rng.randrange(8, n_header), rng.randrange(8)) for _ in range(150)]
    data_bits = [(rng.randrange(n_header, len(data)), rng.randrange(8)) for _ in range(250)]
    results: dict[str, int] = {}
    path = tmp_path / "flip.safetensors"
    different = []
    for pos, bit in header_bits + data_bits:
        buf = bytearray(data)
        buf[pos] ^= 1 << bit
        path.write_bytes(bytes(buf))
        out = _outcome(path, mask)
        results[out] = results.get(out, 0) + 1
        if out == "DIFFERENT":
            different.append((pos, bit))
    assert not different, f"bit flips read as another mask: {different[:10]} ({results})"
    assert results.get("error", 0) >= len(header_bits + data_bits) - 5  # a flip in header padding may be harmless


def test_flips_in_frozen_sets_and_indices_are_errors(original, tmp_path):
    """The case of the issue: flips in the data of frozen sets and slice indices (6 of 25 loaded before)."""
    data, mask = original
    header, body = _split(data)
    n_header = len(data) - len(body)
    targets = [k for k in header if k != "__metadata__" and (".frozen." in k or ".index" in k)]
    rng = random.Random(1)
    path = tmp_path / "flip.safetensors"
    for k in rng.sample(targets, 5):
        start, stop = header[k]["data_offsets"]
        for _ in range(5):
            buf = bytearray(data)
            buf[n_header + rng.randrange(start, stop)] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(buf))
            assert _outcome(path, mask) == "error", k


def test_truncations_are_errors(original, tmp_path):
    data, mask = original
    path = tmp_path / "cut.safetensors"
    cuts = sorted(set([0, 1, 7, 8, 9, 100, len(data) - 1, len(data) - 8] + list(range(16, len(data), 997))))
    for cut in cuts:
        path.write_bytes(data[:cut])
        assert _outcome(path, mask) == "error", cut


def _edits() -> list[tuple[str, object]]:
    """(name, function(header) -> header) edits of the safetensors header JSON."""
    def meta(key, fn):
        def edit(h):
            h["__metadata__"][key] = fn(h["__metadata__"][key])
            return h
        return edit

    def groups(fn):
        def change(text):
            g = json.loads(text)
            fn(g)
            return json.dumps(g)
        return meta("groups", change)

    def tensor(key, field, value):
        def edit(h):
            h[key][field] = value
            return h
        return edit

    def drop(key):
        def edit(h):
            del h["__metadata__"][key]
            return h
        return edit

    return [
        ("shape as text", groups(lambda g: g[0]["slices"][0].__setitem__("shape", "128x64"))),
        ("shape entry as text", groups(lambda g: g[0]["slices"][0].__setitem__("shape", ["128", 64]))),
        ("n_units as text", groups(lambda g: g[0].__setitem__("n_units", "128"))),
        ("n_units negative", groups(lambda g: g[0].__setitem__("n_units", -1))),
        ("axis out of range", groups(lambda g: g[0]["slices"][0].__setitem__("axis", 5))),
        ("axis as float", groups(lambda g: g[0]["slices"][0].__setitem__("axis", 0.0))),
        ("role unknown", groups(lambda g: g[0]["slices"][0].__setitem__("role", "sideways"))),
        ("slices not a list", groups(lambda g: g[1].__setitem__("slices", {"a": 1}))),
        ("group not an object", groups(lambda g: g.__setitem__(0, "group"))),
        ("policies not a list", meta("policies", lambda v: json.dumps({"explicit": 1}))),
        ("policies of numbers", meta("policies", lambda v: json.dumps([1, 2]))),
        ("score names duplicated", meta("score_names", lambda v: json.dumps(json.loads(v) * 2))),
        ("method not an object", meta("method", lambda v: "[1]")),
        ("granularity unknown", meta("granularity", lambda v: "neuron")),
        ("digest dtype unknown", meta("digest_dtypes", lambda v: json.dumps(["float64"]))),
        ("format version 1 with checksum", meta("format_version", lambda v: "1")),
        ("checksum changed", meta("checksum", lambda v: ("0" if v[0] != "0" else "1") + v[1:])),
        ("checksum removed", drop("checksum")),
        ("fingerprint names removed", drop("fingerprint_tensors")),
        ("tensor dtype changed", tensor("g0.s0.index", "dtype", "U8")),
        ("tensor shape changed", tensor("g0.s0.index", "shape", [64, 2])),
        ("tensor offsets shifted", lambda h: (h["g0.s0.index"].__setitem__(
            "data_offsets", [h["g0.s0.index"]["data_offsets"][0] + 4, h["g0.s0.index"]["data_offsets"][1] + 4]), h)[1]),
        ("tensor removed", lambda h: (h.pop("g0.class"), h)[1]),
    ]


@pytest.mark.parametrize("name,edit", _edits(), ids=[e[0] for e in _edits()])
def test_header_edits_are_errors(original, tmp_path, name, edit):
    data, mask = original
    header, body = _split(data)
    path = tmp_path / "edit.safetensors"
    path.write_bytes(_join(edit(header), body))
    assert _outcome(path, mask) == "error"


@pytest.mark.parametrize("name,edit", [e for e in _edits() if "checksum" not in e[0] and "version" not in e[0]
                                       and "digest" not in e[0]],
                         ids=[e[0] for e in _edits() if "checksum" not in e[0] and "version" not in e[0]
                              and "digest" not in e[0]])
def test_header_edits_of_a_v1_file_are_our_errors(tmp_path, name, edit):
    """Version 1 has no checksum: the strict field checks alone must turn every edit into our error (item 8)."""
    header, body = _split(GOLDEN_V1.read_bytes())
    path = tmp_path / "edit.safetensors"
    path.write_bytes(_join(edit(header), body))
    try:
        Mask.load(path)
    except MaskFormatError as exc:
        assert "Traceback" not in str(exc)
        return
    # an edit v1 cannot detect must at least not change what is frozen or where
    loaded, gold = Mask.load(path), Mask.load(GOLDEN_V1)
    assert _same(loaded, gold), name


def test_rewritten_with_another_layout_loads_identically(original, tmp_path):
    """The checksum covers contents, not layout: the same contents re-serialised still load."""
    data, mask = original
    header, body = _split(data)
    path = tmp_path / "pretty.safetensors"
    raw = json.dumps(header, indent=2).encode()  # same header, other whitespace
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    assert _outcome(path, mask) == "same"
