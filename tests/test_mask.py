"""Mask file v2 (and v1 still read): golden files, round trip, validation errors (one error listing every mismatch),
bad files. Damaged files in depth (bit flips, truncations, header edits): tests/test_mask_integrity.py."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ssah_plugin.core.classes import CLASS_NAMES
from ssah_plugin.core.mask import Mask
from ssah_plugin.core.mask_format import FORMAT_VERSION, payload_checksum
from ssah_plugin.errors import MaskFormatError, MaskMismatchError, SSAHError
from ssah_plugin.io.tiny import tiny_model

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN_DIR))
from make_golden import FROZEN, GOLDEN, GOLDEN_V1, LIBRARY_VERSION, build_golden_mask  # noqa: E402

UNITS = {"model.layers.0.mlp": [1, 2, 100], "model.layers.1.self_attn": [0, 31]}



@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def mask_path(llama, tmp_path_factory):
    return Mask.from_units(llama, UNITS).save(tmp_path_factory.mktemp("m") / "mask.safetensors")


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(src, dst, *, meta_update=None, tensor_update=None, resign=False):
    """Copy a mask file with edits; ``resign`` writes a matching checksum (to reach the checks behind it)."""
    meta, tensors = _read(src)
    meta.update(meta_update or {})
    tensors.update(tensor_update or {})
    if resign:
        meta["checksum"] = payload_checksum(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


# ---------------------------------------------------------------------------------------------- golden file
@pytest.mark.parametrize("golden", [GOLDEN, GOLDEN_V1], ids=["v2", "v1"])
def test_golden_file_contents(golden):
    mask = Mask.load(golden)
    assert (mask.architecture, mask.model_class, mask.granularity) == ("llama", "LlamaForCausalLM", "channel")
    assert mask.library_version == LIBRARY_VERSION and mask.method == {"name": "golden", "seed": 0}
    assert mask.default_policy == "explicit" and mask.policies == ["explicit", "scu-manual"]
    assert [(g.name, g.kind, g.layer, g.n_units) for g in mask.groups] == [
        ("model.layers.0.mlp", "mlp", 0, 128), ("model.layers.0.self_attn", "attn", 0, 64),
        ("model.layers.1.mlp", "mlp", 1, 128), ("model.layers.1.self_attn", "attn", 1, 64)]
    g0, g1 = mask.groups[0], mask.groups[1]
    assert [(s.module, s.param, s.axis, s.role, s.shape) for s in g0.slices] == [
        ("model.layers.0.mlp.gate_proj", "weight", 0, "out", (128, 64)),
        ("model.layers.0.mlp.up_proj", "weight", 0, "out", (128, 64)),
        ("model.layers.0.mlp.down_proj", "weight", 1, "in", (64, 128))]
    for s in g0.slices:
        assert torch.equal(s.index, torch.arange(128).reshape(128, 1))
    assert [(s.module, s.axis, s.role, s.shape) for s in g1.slices] == [
        ("model.layers.0.self_attn.v_proj", 0, "out", (32, 64)), ("model.layers.0.self_attn.o_proj", 1, "in", (64, 64))]
    ch = torch.arange(64)
    assert torch.equal(g1.slices[0].index.squeeze(1), (ch // 16 // 2) * 16 + ch % 16)
    assert torch.equal(g1.slices[1].index.squeeze(1), ch)
    frozen = mask.frozen()
    for gi, g in enumerate(mask.groups):
        assert frozen[gi].nonzero().squeeze(1).tolist() == FROZEN.get(g.name, [])
        assert mask.scores["safety"][gi].dtype == torch.float64
        assert torch.equal(mask.scores["safety"][gi], torch.arange(g.n_units, dtype=torch.float64) / 8 + gi)
        assert torch.equal(mask.scores["safety_z"][gi], torch.linspace(-2, 2, g.n_units, dtype=torch.float64))
        want = torch.tensor([i % 4 for i in range(g.n_units)], dtype=torch.uint8)
        if gi == 0:
            want[1] = 255
        assert torch.equal(mask.classes[gi], want)
        assert torch.equal(mask.frozen("scu-manual")[gi], want == 1)
    assert list(mask.fingerprint)[:3] == ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                          "model.layers.0.mlp.down_proj.weight"]
    assert len(mask.fingerprint) == 10 and all(v.shape == (32,) for v in mask.fingerprint.values())
    assert mask.summary()["frozen_units"] == 6
    assert mask.summary()["classes"] == {"SCU": 95, "UCU": 96, "CU": 96, "RU": 96}


def test_golden_file_is_what_we_write_today(tmp_path):
    gold_meta, gold_t = _read(GOLDEN)
    assert gold_meta["format"] == "ssah-mask" and gold_meta["format_version"] == str(FORMAT_VERSION) == "2"
    # (a) load + save reproduces the golden file exactly (metadata and every tensor, dtype included)
    again_meta, again_t = _read(Mask.load(GOLDEN).save(tmp_path / "again.safetensors"))
    assert again_meta == gold_meta
    assert set(again_t) == set(gold_t)
    for k in gold_t:
        assert again_t[k].dtype == gold_t[k].dtype and torch.equal(again_t[k], gold_t[k]), k
    # (b) building the same mask today from the tiny model writes the same file
    today_meta, today_t = _read(build_golden_mask().save(tmp_path / "today.safetensors"))
    assert today_meta == gold_meta
    for k in gold_t:
        assert today_t[k].dtype == gold_t[k].dtype and torch.equal(today_t[k], gold_t[k]), k
    assert {k: str(v.dtype) for k, v in gold_t.items() if k.startswith("g0.")} == {
        "g0.s0.index": "torch.int32", "g0.s1.index": "torch.int32", "g0.s2.index": "torch.int32",
        "g0.score.safety": "torch.float64", "g0.score.safety_z": "torch.float64", "g0.class": "torch.uint8",
        "g0.frozen.explicit": "torch.uint8", "g0.frozen.scu-manual": "torch.uint8",
        **{f"g0.s{i}.digest.{d}": "torch.uint8" for i in range(3) for d in ("float32", "bfloat16", "float16")}}
    assert json.loads(gold_meta["digest_dtypes"]) == ["float32", "bfloat16", "float16"]
    assert gold_meta["checksum"] == payload_checksum(gold_meta, gold_t)


def test_v1_golden_reads_as_before_and_saves_as_v2(tmp_path):
    """Version 1 stays readable; re-saving it writes version 2 with the same contents (no digests: none recorded)."""
    v1_meta, v1_t = _read(GOLDEN_V1)
    assert v1_meta["format_version"] == "1" and "checksum" not in v1_meta
    mask = Mask.load(GOLDEN_V1)
    assert mask.digests == {}
    meta, tensors = _read(mask.save(tmp_path / "up.safetensors"))
    assert meta["format_version"] == "2" and json.loads(meta["digest_dtypes"]) == []
    assert {k: v for k, v in meta.items() if k not in ("format_version", "digest_dtypes", "digest_algorithm",
                                                        "checksum")} == {k: v for k, v in v1_meta.items()
                                                                         if k != "format_version"}
    assert set(tensors) == set(v1_t) and all(torch.equal(tensors[k], v1_t[k]) for k in v1_t)
    upgraded = Mask.load(tmp_path / "up.safetensors").record_base(tiny_model("llama", seed=0))
    gold = Mask.load(GOLDEN)
    assert set(upgraded.digests) == set(gold.digests)
    for d in gold.digests:
        for a, b in zip(upgraded.digests[d], gold.digests[d]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_record_base_reads_gathered_zero3_params_and_refuses_placeholders():
    """A ZeRO-3 parameter inside ``GatheredParameters`` (``ds_shape`` set, full storage) is read like any tensor; a
    partitioned placeholder (``ds_shape`` set, empty storage) cannot be, and is named."""
    model = tiny_model("llama", seed=0)
    gold = Mask.load(GOLDEN)
    for p in model.parameters():
        p.ds_shape = p.shape  # what deepspeed leaves on a gathered parameter
    gathered = Mask.load(GOLDEN).record_base(model)
    for d in gold.digests:
        for a, b in zip(gathered.digests[d], gold.digests[d]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    weight = model.model.layers[0].mlp.down_proj.weight
    weight.data = torch.empty(0)  # the partition outside a gather: no values here
    with pytest.raises(MaskMismatchError, match="cannot read the base values of model.layers.0.mlp.down_proj"):
        Mask.load(GOLDEN).record_base(model)
    assert Mask.load(GOLDEN_V1).record_base(model, missing="skip").digests == Mask.load(GOLDEN_V1).digests


@pytest.mark.parametrize("golden", [GOLDEN, GOLDEN_V1], ids=["v2", "v1"])
def test_golden_validates_against_its_model(golden):
    Mask.load(golden).validate(tiny_model("llama", seed=0))


# ---------------------------------------------------------------------------------------------- API
def test_from_units_round_trip(llama, mask_path):
    mask = Mask.load(mask_path)
    frozen = mask.frozen()
    assert frozen[0].nonzero().squeeze(1).tolist() == [1, 2, 100]
    assert frozen[3].nonzero().squeeze(1).tolist() == [0, 31]
    assert mask.frozen_fraction() == pytest.approx(5 / 384)
    s = mask.summary()
    assert s["frozen_units"] == 5 and s["units"] == 384 and "classes" not in s
    assert oct(os.stat(mask_path).st_mode & 0o777) != oct(0o600)
    mask.validate(llama)
    assert Mask.from_units(llama, {}).frozen_fraction() == 0.0
    head = Mask.from_units(llama, {"model.layers.0.self_attn": [3]}, granularity="head", policy="mine")
    assert head.default_policy == "mine" and head.groups[1].n_units == 4 and head.groups[1].channels_per_unit == 16


def test_from_units_errors_list_everything(llama):
    with pytest.raises(MaskMismatchError) as e:
        Mask.from_units(llama, {"model.layers.9.mlp": [0], "model.layers.0.mlp": [128, -1], "mlp": [1]})
    assert len(e.value.problems) == 3
    msg = str(e.value)
    assert "unknown unit group 'model.layers.9.mlp'" in msg and "out of range [0, 128)" in msg and "[128, -1]" in msg


# ---------------------------------------------------------------------------------------------- validation
def test_missing_parameter_and_wrong_shape_in_one_error(mask_path):
    other = tiny_model("llama", num_hidden_layers=1, intermediate_size=96)
    with pytest.raises(MaskMismatchError) as e:
        Mask.load(mask_path).validate(other)
    msg = str(e.value)
    assert "missing parameter model.layers.1.mlp.gate_proj.weight" in msg
    assert "wrong shape for model.layers.0.mlp.gate_proj.weight: mask has [128, 64], model has [96, 64]" in msg
    assert len(e.value.problems) >= 6  # every problem, not only the first
    assert "Traceback" not in msg and "Fix:" in msg


def test_index_out_of_range(mask_path, tmp_path):
    bad = _rewrite(mask_path, tmp_path / "bad.safetensors",
                   tensor_update={"g0.s2.index": torch.full((128, 1), 500, dtype=torch.int32)})
    with pytest.raises(MaskFormatError, match="damaged.*do not match the checksum"):
        Mask.load(bad)
    resigned = _rewrite(mask_path, tmp_path / "resigned.safetensors", resign=True,
                        tensor_update={"g0.s2.index": torch.full((128, 1), 500, dtype=torch.int32)})
    with pytest.raises(MaskFormatError, match=r"g0.s2.index.*outside \[0, 128\)"):
        Mask.load(resigned)
    mask = Mask.load(mask_path)  # an in-memory mask edited by hand is checked by validate()
    mask.groups[0].slices[2].index = torch.full((128, 1), 500)
    with pytest.raises(MaskMismatchError, match=r"down_proj.weight: index out of range along axis 1 \(size 128, "
                                                r"max index 500\)"):
        mask.validate(tiny_model("llama", seed=0))


def test_other_weights_fingerprint(mask_path):
    with pytest.raises(MaskMismatchError, match=r"mask was made for other weights: 10 of 10"):
        Mask.load(mask_path).validate(tiny_model("llama", seed=1))
    Mask.load(mask_path).validate(tiny_model("llama", seed=1), check_fingerprint=False)


def test_fingerprint_tolerates_bf16_and_fine_tuning(llama, mask_path):
    mask = Mask.load(mask_path)
    mask.validate(tiny_model("llama", seed=0, dtype=torch.bfloat16))  # same weights, bf16 rounding
    tuned = tiny_model("llama", seed=0)
    opt = torch.optim.AdamW(tuned.parameters(), lr=1e-3)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        tuned(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(tuned.model.layers[0].mlp.gate_proj.weight, llama.model.layers[0].mlp.gate_proj.weight)
    mask.validate(tuned)  # a resumed / fine-tuned checkpoint of the same base is not "other weights"


def test_fingerprint_zero_biases_then_trained(tmp_path):
    """GPT-2 biases start at zero: after training they are not, and that is not 'other weights'."""
    model = tiny_model("gpt2", seed=0)
    mask = Mask.from_units(model, {"transformer.h.0.mlp": [1]})
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.bias.add_(0.01)
    mask.validate(model)


def test_other_architecture(mask_path):
    with pytest.raises(MaskMismatchError) as e:
        Mask.load(mask_path).validate(tiny_model("gpt2"))
    msg = str(e.value)
    assert "mask was made for architecture 'llama', model is 'gpt2'" in msg
    assert "missing parameter model.layers.0.mlp.gate_proj.weight" in msg


def test_unknown_policy(mask_path):
    with pytest.raises(SSAHError, match=r"unknown policy 'scu\+everything'.*stores \['explicit'\]"):
        Mask.load(mask_path).frozen("scu+everything")


# ---------------------------------------------------------------------------------------------- bad files
def test_unknown_format_version(mask_path, tmp_path):
    bad = _rewrite(mask_path, tmp_path / "v9.safetensors", meta_update={"format_version": "9"})
    with pytest.raises(MaskFormatError, match=r"mask format version '9'.*reads versions 1, 2.*Upgrade ssah-plugin"):
        Mask.load(bad)


def test_truncated_file(mask_path, tmp_path):
    data = Path(mask_path).read_bytes()
    for cut in (len(data) // 2, 10, 0):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(MaskFormatError, match="not a readable safetensors file.*truncated or corrupt"):
            Mask.load(bad)


def test_random_bytes_file(tmp_path):
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    with pytest.raises(MaskFormatError, match="not a readable safetensors file"):
        Mask.load(bad)


def test_model_weights_file_is_not_a_mask(llama, tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in llama.state_dict().items()}, str(weights), metadata={"format": "pt"})
    with pytest.raises(MaskFormatError, match=r"not an ssah-plugin mask \(metadata format='pt'\).*model weights"):
        Mask.load(weights)


def test_missing_file_and_damaged_contents(mask_path, tmp_path):
    with pytest.raises(MaskFormatError, match="does not exist"):
        Mask.load(tmp_path / "nope.safetensors")
    for resign in (False, True):  # without a matching checksum: damaged; with one: the field checks behind it
        bad = _rewrite(mask_path, tmp_path / "nojson.safetensors", meta_update={"groups": "{not json"}, resign=resign)
        with pytest.raises(MaskFormatError, match="damaged"):
            Mask.load(bad)
        meta, tensors = _read(mask_path)
        del tensors["g1.s0.index"]
        if resign:
            meta["checksum"] = payload_checksum(meta, tensors)
        save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
        with pytest.raises(MaskFormatError, match="damaged.*" + ("g1.s0.index" if resign else "checksum")):
            Mask.load(tmp_path / "missing.safetensors")
        bad = _rewrite(mask_path, tmp_path / "short.safetensors", resign=resign,
                       tensor_update={"g0.frozen.explicit": torch.zeros(5, dtype=torch.uint8)})
        with pytest.raises(MaskFormatError, match="damaged.*" + ("g0.frozen.explicit" if resign else "checksum")):
            Mask.load(bad)


def test_class_names_are_stable():
    assert CLASS_NAMES == {0: "RU", 1: "SCU", 2: "UCU", 3: "CU", 255: "unknown"}
    assert json.loads(_read(GOLDEN)[0]["policies"]) == ["explicit", "scu-manual"]
