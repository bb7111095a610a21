"""verify: lazy reading of sharded safetensors, bit-exact drift detection, tolerance, reports, exit codes, inputs."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ssah_plugin.evaluation.verify as verify_mod
from ssah_plugin.cli import main
from ssah_plugin.core.mask import Mask
from ssah_plugin.core.plan import plan_frozen_slices
from ssah_plugin.errors import DataError, MaskFormatError, MaskMismatchError
from ssah_plugin.io.checkpoint import SafetensorsCheckpoint
from ssah_plugin.io.tiny import tiny_model

SHARD = "40KB"  # the tiny llama (~0.5 MB) is written as ~13 shards + index


def classified_mask(model) -> Mask:
    """A mask with classes (unit i of every group has class i % 4: RU, SCU, UCU, CU) and an explicit set."""
    mask = Mask.from_units(model, {"model.layers.0.mlp": [1, 2], "model.layers.1.self_attn": [5]})
    mask.classes = [torch.arange(g.n_units, dtype=torch.uint8) % 4 for g in mask.groups]
    return mask


def perturb_trainable(model, mask, policy, seed=1):
    """Change every parameter, then write the base values back into the frozen slices (what freezing achieves)."""
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        for s in plan_frozen_slices(mask, model, policy):
            p = s.param
            p.index_copy_(s.axis, s.index, base[s.name].index_select(s.axis, s.index))
    return model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    model = tiny_model("llama")
    model.save_pretrained(root / "base", max_shard_size=SHARD)
    mask = classified_mask(model)
    mask.save(root / "mask.safetensors")
    tuned = perturb_trainable(tiny_model("llama"), mask, "scu")
    tuned.save_pretrained(root / "tuned", max_shard_size=SHARD)
    # one frozen element (an SCU of layer 0's MLP: unit 1, column 1 of down_proj) moved by one float32 ulp
    w = tuned.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w[3, 1] = torch.nextafter(w[3, 1], torch.tensor(math.inf))
    tuned.save_pretrained(root / "tuned_one", max_shard_size=SHARD)
    return root, mask


def test_checkpoint_is_sharded_and_read_lazily(ckpts, monkeypatch):
    root, _ = ckpts
    ckpt = SafetensorsCheckpoint(root / "base")
    assert (root / "base" / "model.safetensors.index.json").is_file()
    assert len(ckpt._files) > 3
    assert ckpt.get_rows("model.layers.0.mlp.down_proj.weight", 2, 5).shape == (3, 128)
    assert ckpt.resolve("layers.0.mlp.down_proj.weight") == "model.layers.0.mlp.down_proj.weight"
    read = []
    orig = SafetensorsCheckpoint.get_rows
    monkeypatch.setattr(SafetensorsCheckpoint, "get_rows",
                        lambda self, n, a, b: read.append(n) or orig(self, n, a, b))
    monkeypatch.setattr(verify_mod, "_CHUNK_ELEMENTS", 1000)  # many row chunks per tensor
    report = verify_mod.verify_checkpoint(root / "base", root / "tuned", root / "mask.safetensors", policy="scu",
                                          progress=False)
    assert report.ok
    assert set(read) == {s.name for g in _groups(root) for s in g.slices}  # unit-bearing tensors only
    assert "model.embed_tokens.weight" not in read


def _groups(root):
    return Mask.load(root / "mask.safetensors").groups


@pytest.mark.parametrize("chunk", [1000, 1 << 24])
def test_untouched_frozen_units_pass_and_report_counts(ckpts, monkeypatch, chunk):
    root, mask = ckpts
    monkeypatch.setattr(verify_mod, "_CHUNK_ELEMENTS", chunk)
    report = verify_mod.verify_checkpoint(root / "base", root / "tuned", mask, policy="scu", progress=False)
    n_scu = sum(int((c == 1).sum()) for c in mask.classes)
    assert report.ok and report.exit_code == 0
    assert report.total.frozen_units == n_scu and report.total.changed_units == 0 and report.total.max_drift == 0.0
    assert report.total.trainable_changed_units == report.total.trainable_units == mask.n_units - n_scu
    assert set(report.per_class) == {"SCU", "CU", "UCU", "RU"}
    assert report.per_class["SCU"].frozen_units == n_scu and report.per_class["RU"].frozen_units == 0
    assert set(report.per_layer) == {0, 1} and len(report.per_group) == 4
    assert report.tensors_checked == 10 and not report.dtype_casts


def test_single_changed_frozen_element_is_detected(ckpts):
    root, mask = ckpts
    report = verify_mod.verify_checkpoint(root / "base", root / "tuned_one", mask, policy="scu", progress=False)
    assert not report.ok and report.exit_code == 1
    assert report.total.violating_units == 1 and report.total.changed_units == 1
    assert 0 < report.total.max_drift < 1e-6
    assert report.per_class["SCU"].changed_units == 1 and report.per_class["CU"].changed_units == 0
    assert report.per_layer[0].changed_units == 1 and report.per_layer[1].changed_units == 0
    assert report.per_group["model.layers.0.mlp"].changed_units == 1
    assert report.per_class["SCU"].fraction_changed == pytest.approx(1 / report.per_class["SCU"].frozen_units)
    assert "DRIFT: 1 of" in report.format_text()
    # the explicit set (units 1, 2 of layer 0 MLP; 5 of layer 1 attention) holds unit 1 and unit 2, a UCU that
    # training under "scu" was free to change: verifying against the wrong policy reports it
    explicit = verify_mod.verify_checkpoint(root / "base", root / "tuned_one", mask, progress=False)
    assert explicit.policy == "explicit" and explicit.total.frozen_units == 3 and explicit.total.changed_units == 2


def test_tolerance(ckpts):
    root, mask = ckpts
    loose = verify_mod.verify_checkpoint(root / "base", root / "tuned_one", mask, policy="scu", tolerance=1e-3,
                                         progress=False)
    assert loose.ok and loose.total.changed_units == 1 and loose.total.violating_units == 0
    with pytest.raises(ValueError):
        verify_mod.verify_checkpoint(root / "base", root / "tuned", mask, tolerance=-1.0)
    with pytest.raises(ValueError):
        verify_mod.verify_checkpoint(root / "base", root / "tuned", mask, tolerance=float("nan"))


def test_cli_exit_codes_and_json(ckpts, capsys):
    root, _ = ckpts
    args = ["verify", "--base", str(root / "base"), "--mask", str(root / "mask.safetensors"), "--policy", "scu",
            "--no-progress"]
    assert main(args + ["--tuned", str(root / "tuned")]) == 0
    assert "OK:" in capsys.readouterr().out
    assert main(args + ["--tuned", str(root / "tuned_one"), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["exit_code"] == 1 and out["total"]["violating_units"] == 1
    assert out["per_class"]["SCU"]["changed_units"] == 1 and out["per_layer"]["0"]["changed_units"] == 1
    assert main(args + ["--tuned", str(root / "tuned_one"), "--tolerance", "0.01"]) == 0
    capsys.readouterr()
    assert main(args + ["--tuned", str(root / "missing")]) == 2
    assert main(args + ["--tuned", str(root / "missing"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["exit_code"] == 2
    with pytest.raises(SystemExit) as exc:
        main(args + ["--tuned", str(root / "tuned"), "--tolerance", "-1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["verify", "--base", str(root / "base")])
    assert exc.value.code == 2


def test_bf16_tuned_is_compared_in_bf16(ckpts, tmp_path):
    root, mask = ckpts
    tuned = perturb_trainable(tiny_model("llama"), mask, "scu").to(torch.bfloat16)
    tuned.save_pretrained(tmp_path / "bf16")
    with pytest.warns(UserWarning, match="different dtypes"):
        report = verify_mod.verify_checkpoint(root / "base", tmp_path / "bf16", mask, policy="scu", progress=False)
    assert report.ok and report.total.max_drift == 0.0
    assert report.dtype_casts[0]["base_dtype"] == "float32" and report.dtype_casts[0]["tuned_dtype"] == "bfloat16"
    # upcasting the bf16 values instead would have reported rounding error as drift: the decision matters
    w = SafetensorsCheckpoint(root / "base").get("model.layers.0.mlp.down_proj.weight")
    assert not torch.equal(w.to(torch.bfloat16).float(), w)
    # a change of a frozen element (an SCU channel of layer 1's o_proj) in the bf16 checkpoint is caught
    with torch.no_grad():
        tuned.model.layers[1].self_attn.o_proj.weight[0, 5] += 0.01
    tuned.save_pretrained(tmp_path / "bf16_bad")
    with pytest.warns(UserWarning):
        bad = verify_mod.verify_checkpoint(root / "base", tmp_path / "bf16_bad", mask, policy="scu", progress=False)
    assert bad.total.violating_units == 1 and bad.per_group["model.layers.1.self_attn"].changed_units == 1


def test_nan_in_frozen_unit_is_infinite_drift(ckpts, tmp_path):
    root, mask = ckpts
    tuned = perturb_trainable(tiny_model("llama"), mask, "scu")
    with torch.no_grad():
        tuned.model.layers[0].mlp.up_proj.weight[1, 0] = float("nan")  # row 1 = unit 1 (SCU)
    tuned.save_pretrained(tmp_path / "nan")
    report = verify_mod.verify_checkpoint(root / "base", tmp_path / "nan", mask, policy="scu", progress=False)
    assert not report.ok and math.isinf(report.total.max_drift)
    assert json.loads(report.to_json())["total"]["max_drift"] == "inf"


def test_missing_tensor_and_incomplete_checkpoints(ckpts, tmp_path):
    root, mask = ckpts
    tensors = {}
    for f in sorted((root / "tuned").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    (tmp_path / "partial").mkdir()
    save_file(tensors, str(tmp_path / "partial" / "model.safetensors"))
    with pytest.raises(DataError, match="model.layers.1.self_attn.v_proj.weight"):
        verify_mod.verify_checkpoint(root / "base", tmp_path / "partial", mask, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(root / "tuned", broken)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(DataError, match="do not exist"):
        verify_mod.verify_checkpoint(root / "base", broken, mask, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="safe_serialization"):
        verify_mod.verify_checkpoint(root / "base", tmp_path / "empty", mask, progress=False)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DataError, match="not a readable"):
        verify_mod.verify_checkpoint(root / "base", junk, mask, progress=False)
    with pytest.raises(MaskFormatError):
        verify_mod.verify_checkpoint(root / "base", root / "tuned", junk, progress=False)


def test_mask_for_another_model(ckpts, tmp_path):
    root, _ = ckpts
    wider = tiny_model("llama", intermediate_size=96)
    other = Mask.from_units(wider, {"model.layers.0.mlp": [0]})
    with pytest.raises(MaskMismatchError, match="shape"):
        verify_mod.verify_checkpoint(root / "base", root / "tuned", other, progress=False)
    gpt2 = Mask.from_units(tiny_model("gpt2"), {"transformer.h.0.mlp": [0]})
    with pytest.raises(MaskMismatchError, match="architecture"):
        verify_mod.verify_checkpoint(root / "base", root / "tuned", gpt2, progress=False)
    reseeded = Mask.from_units(tiny_model("llama", seed=7), {"model.layers.0.mlp": [1]})
    with pytest.raises(MaskMismatchError, match="fingerprint"):
        verify_mod.verify_checkpoint(root / "base", root / "tuned", reseeded, progress=False)
    report = verify_mod.verify_checkpoint(root / "base", root / "base", reseeded, check_fingerprint=False,
                                          progress=False)
    assert report.ok and report.per_class is None


def test_policy_that_freezes_nothing_warns(ckpts):
    root, mask = ckpts
    with pytest.warns(UserWarning, match="nothing to verify"):
        report = verify_mod.verify_checkpoint(root / "base", root / "tuned_one", mask, policy="none", progress=False)
    assert report.ok and report.total.frozen_units == 0


def test_peft_adapter_folder_is_merged_then_verified(ckpts, tmp_path):
    """A LoRA adapter whose A columns for frozen down_proj units are zero keeps them exact; a dense one does not."""
    peft = pytest.importorskip("peft")
    root, mask = ckpts
    policy = "scu"
    frozen_cols = torch.nonzero(mask.frozen(policy)[0]).squeeze(1)  # layer 0 MLP units = down_proj input columns

    def adapter(path, keep_frozen):
        model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["down_proj"]))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                    if keep_frozen and "lora_A" in name and "layers.0." in name:
                        p[:, frozen_cols] = 0
        model.save_pretrained(path)

    adapter(tmp_path / "good", keep_frozen=True)
    adapter(tmp_path / "bad", keep_frozen=False)
    good = verify_mod.verify_checkpoint(root / "base", tmp_path / "good", mask, policy=policy, progress=False)
    # layer 1's SCU columns were not protected in either adapter; layer 0's were in "good"
    assert good.per_group["model.layers.0.mlp"].changed_units == 0
    assert good.per_group["model.layers.0.mlp"].trainable_changed_units > 0
    bad = verify_mod.verify_checkpoint(root / "base", tmp_path / "bad", mask, policy=policy, progress=False)
    assert bad.per_group["model.layers.0.mlp"].changed_units == len(frozen_cols)
    with pytest.raises(DataError, match="adapter"):
        from ssah_plugin.io.checkpoint import open_checkpoint
        open_checkpoint(tmp_path / "good")


@pytest.mark.parametrize("family,granularity", [("gpt2", "channel"), ("phi3", "head"), ("qwen3", "head")])
def test_other_layouts_fused_and_head_units(tmp_path, family, granularity):
    """Conv1D layout (GPT-2), fused gate_up/qkv (Phi-3) and head units: every slice of a unit is checked."""
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    groups = Mask.empty_for(model, granularity).groups
    attn = next(g for g in groups if g.kind == "attn" and g.layer == 1)
    mask = Mask.from_units(model, {attn.name: [1]}, granularity=granularity)
    for si, s in enumerate(attn.slices):  # move one element of each slice of unit 1 in turn
        p = model.get_submodule(s.module).get_parameter(s.param)
        pos = [0] * p.dim()
        pos[s.axis] = int(s.index[1, -1])
        with torch.no_grad():
            p[tuple(pos)] += 1e-3
        model.save_pretrained(tmp_path / f"t{si}", max_shard_size=SHARD)
        report = verify_mod.verify_checkpoint(tmp_path / "base", tmp_path / f"t{si}", mask, progress=False)
        assert report.total.changed_units == 1 and report.per_group[attn.name].changed_units == 1, s.name
        with torch.no_grad():
            p[tuple(pos)] -= 1e-3
        # the last unit is trainable, and shares no value row with unit 1 even under grouped-query attention
        # (there heads 0 and 1 read the same value rows, so moving unit 0's value row *is* a change of unit 1)
        pos[s.axis] = int(s.index[-1, 0])
        with torch.no_grad():
            p[tuple(pos)] += 1e-3
        model.save_pretrained(tmp_path / f"n{si}", max_shard_size=SHARD)
        assert verify_mod.verify_checkpoint(tmp_path / "base", tmp_path / f"n{si}", mask, progress=False).ok, s.name
        with torch.no_grad():
            p[tuple(pos)] -= 1e-3
