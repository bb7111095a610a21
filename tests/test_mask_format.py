"""The shared pieces under the mask file: the one safetensors reader, the one fingerprint check, a framework-free core.

``ssah_plugin.core.tensor_file`` serves both mask files and model checkpoints (``ssah-plugin verify``);
``ssah_plugin.core.fingerprint.fingerprint_mismatches`` serves both ``Mask.validate`` (live model) and
``verify_checkpoint`` (base checkpoint on disk). Each test here can fail: the reader must refuse what it cannot read
and return exactly the stored bytes, the fingerprint check must tell other weights from the same weights in bf16.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from ssah_plugin.core import fingerprint as fp_mod
from ssah_plugin.core.fingerprint import fingerprint_mismatches, fingerprint_samples
from ssah_plugin.core.mask import Mask
from ssah_plugin.core.tensor_file import ST_DTYPES, TensorFile, TensorFileError
from ssah_plugin.errors import DataError, MaskFormatError, MaskMismatchError
from ssah_plugin.io.checkpoint import SafetensorsCheckpoint
from ssah_plugin.io.tiny import tiny_model


@pytest.fixture()
def st_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16),
               "c": torch.arange(5, dtype=torch.int32)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    return path, tensors


def test_tensor_file_reads_exactly_and_lazily(st_file):
    path, tensors = st_file
    f = TensorFile(path)
    assert f.metadata() == {"k": "v"} and sorted(f.keys()) == ["a", "b", "c"]
    assert f.shape("a") == (6, 4) and f.dtype("b") == torch.bfloat16 and f.dtype_code("c") == "I32"
    for k, t in tensors.items():
        got = f.get(k)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert torch.equal(f.get_rows("a", 2, 5), tensors["a"][2:5])
    assert all(torch.equal(v, tensors[k]) for k, v in f.read_all().items())
    with pytest.raises(KeyError):
        f.get("missing")


def test_checkpoint_dtypes_come_from_the_one_table(st_file):
    path, _ = st_file
    ckpt = SafetensorsCheckpoint(path)
    assert ckpt.dtype("a") is ST_DTYPES["F32"] and ckpt.dtype("b") is ST_DTYPES["BF16"]
    assert ckpt.dtype("c") is ST_DTYPES["I32"]


def test_truncated_file_is_one_error_for_masks_and_checkpoints(tmp_path):
    good = Mask.from_units(tiny_model("llama"), {"model.layers.0.mlp": [1]}).save(tmp_path / "m.safetensors")
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(TensorFileError, match="not a readable safetensors file") as ei:
        TensorFile(bad)
    assert isinstance(ei.value, DataError) and ei.value.reason
    with pytest.raises(DataError, match="not a readable safetensors file"):
        SafetensorsCheckpoint(bad)
    with pytest.raises(MaskFormatError, match="not a readable safetensors file.*truncated or corrupt"):
        Mask.load(bad)


def test_fingerprint_mismatches_tells_other_weights_from_rounded_ones():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    ref = {"w": fingerprint_samples(w), "zeros": torch.zeros(32), "absent": fingerprint_samples(w)}
    other = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    same = {"w": w.to(torch.bfloat16), "zeros": torch.randn(8), "absent": None}
    assert fingerprint_mismatches(ref, same.get) == []  # bf16 rounding, trained zeros, skipped tensor
    assert fingerprint_mismatches(ref, {"w": other, "zeros": other}.get) == ["w"]
    assert fingerprint_mismatches(ref, {"w": -w}.get) == ["w"]


def test_validate_and_verify_share_the_fingerprint_check(tmp_path, monkeypatch):
    """Both callers go through core.fingerprint.fingerprint_mismatches: replace it, and both report what it says."""
    model = tiny_model("llama")
    mask = Mask.from_units(model, {"model.layers.0.mlp": [1]})
    model.save_pretrained(tmp_path / "base")
    calls = []

    def fake(fingerprint, get):
        names = list(fingerprint)
        calls.append([get(n) is not None for n in names])
        return names[:1]

    import ssah_plugin.core.mask as mask_mod
    import ssah_plugin.evaluation.verify as verify_mod

    assert mask_mod.fingerprint_mismatches is fp_mod.fingerprint_mismatches
    assert verify_mod.fingerprint_mismatches is fp_mod.fingerprint_mismatches
    monkeypatch.setattr(mask_mod, "fingerprint_mismatches", fake)
    monkeypatch.setattr(verify_mod, "fingerprint_mismatches", fake)
    with pytest.raises(MaskMismatchError, match="other weights"):
        mask.validate(model)
    with pytest.raises(MaskMismatchError, match="fingerprint"):
        verify_mod.verify_checkpoint(tmp_path / "base", tmp_path / "base", mask, progress=False)
    assert len(calls) == 2 and all(all(c) for c in calls)  # every recorded tensor was found in both


def test_core_imports_no_framework():
    """core (and hosts.peft / io.adapters at import) pull in none of transformers, peft, deepspeed."""
    code = ("import sys; import ssah_plugin.core.mask, ssah_plugin.core.plan, ssah_plugin.core.peft_layout, "
            "ssah_plugin.core.tensor_file, ssah_plugin.hosts.peft, ssah_plugin.io.adapters; "
            "print(sorted(m for m in ('transformers', 'peft', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
