"""ablate: zeroing a class touches exactly its units' slices (bitwise), restores exactly, CLI rows."""
from __future__ import annotations

import json

import pytest
import torch

from ssah_plugin.core.mask import CLASS_CODES
from ssah_plugin.core.units import describe_units
from ssah_plugin.io.tiny import tiny_model
from ssah_plugin.locate import LocateConfig, ablated_copy, build_mask, restore_units, zero_units


def _mask(model, granularity="channel"):
    groups = describe_units(model, granularity)
    torch.manual_seed(1)
    s = [torch.rand(g.n_units, dtype=torch.float64) for g in groups]
    u = [torch.rand(g.n_units, dtype=torch.float64) for g in groups]
    return build_mask(model, groups, s, u, LocateConfig(granularity=granularity))


def _expected(model, mask, cls, output_only=False):
    """The state dict after ablation, built directly from the mask's slice lists."""
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    for g, c in zip(mask.groups, mask.classes):
        units = torch.nonzero(c.long() == CLASS_CODES[cls]).squeeze(1)
        for s in g.slices:
            if output_only and not (s.module == g.score_module and s.role == "in"):
                continue
            for u in units.tolist():
                params[s.name].index_fill_(s.axis, s.index[u], 0.0)
    return params


@pytest.mark.parametrize("family,granularity", [("llama", "channel"), ("llama", "head"), ("gpt2", "channel"),
                                                ("phi3", "channel")])
@pytest.mark.parametrize("output_only", [False, True])
def test_zero_units_touches_exactly_the_class_slices(family, granularity, output_only):
    model = tiny_model(family)
    mask = _mask(model, granularity)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for cls in ("SCU", "RU"):
        expected = _expected(model, mask, cls, output_only)
        saved = zero_units(model, mask, [cls], output_only=output_only, keep=True)
        after = dict(model.named_parameters())
        changed = [k for k in before if not torch.equal(after[k], before[k])]
        assert changed  # something was zeroed
        for k in before:
            assert torch.equal(after[k], expected[k]), k  # exactly the intended slices, nothing else
        restore_units(saved)
        assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())  # bit-exact restore


def test_ablated_copy_leaves_original_and_removes_unit_output():
    model = tiny_model("llama").eval()
    mask = _mask(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    clone = ablated_copy(model, mask, ["SCU"], output_only=True)
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    g = mask.groups[0]  # layer-0 MLP: a zeroed unit contributes nothing to down_proj's output
    units = torch.nonzero(mask.classes[0].long() == CLASS_CODES["SCU"]).squeeze(1)
    down = clone.get_submodule(g.score_module)
    x = torch.zeros(1, g.n_units)
    x[0, units] = 5.0
    assert torch.equal(down(x), torch.zeros(1, down.out_features))


def test_cli_ablate_json(tmp_path, capsys):
    from ssah_plugin.cli import main

    model = tiny_model("llama")
    path = _mask(model).save(tmp_path / "m.safetensors")
    rc = main(["ablate", "--model", "tiny:llama", "--mask", str(path), "--class", "SCU", "--class", "RU",
               "--n-harmful", "2", "--n-benign", "2", "--max-new-tokens", "4", "--no-progress", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["model"]: r for r in out["rows"]}
    assert set(rows) == {"dense", "-SCU", "-RU"}
    assert rows["-SCU"]["units_removed"] == 5 and rows["-RU"]["units_removed"] == 57
    assert rows["dense"]["units_removed"] == 0 and rows["dense"]["n_harmful"] == 2
    assert rows["-RU"]["benign_loss"] != rows["dense"]["benign_loss"]


def test_cli_ablate_rejects_mask_of_other_model(tmp_path, capsys):
    from ssah_plugin.cli import main

    path = _mask(tiny_model("llama", seed=5)).save(tmp_path / "m.safetensors")
    rc = main(["ablate", "--model", "tiny:llama", "--mask", str(path), "--class", "SCU", "--n-harmful", "1",
               "--n-benign", "1", "--no-progress"])
    assert rc == 2
    assert "other weights" in capsys.readouterr().err
