"""inspect: counts per class / layer / module type, frozen units per policy, JSON and PNG plot."""
from __future__ import annotations

import json

import pytest
import torch

from ssah_plugin.core.mask import Mask
from ssah_plugin.core.units import describe_units
from ssah_plugin.io.tiny import tiny_model
from ssah_plugin.locate import LocateConfig, build_mask


@pytest.fixture(scope="module")
def mask_path(tmp_path_factory):
    model = tiny_model("llama", num_hidden_layers=3)
    groups = describe_units(model)
    torch.manual_seed(0)
    s = [torch.rand(g.n_units, dtype=torch.float64) for g in groups]
    u = [torch.rand(g.n_units, dtype=torch.float64) for g in groups]
    return build_mask(model, groups, s, u, LocateConfig()).save(tmp_path_factory.mktemp("m") / "m.safetensors")


def test_inspect_json_and_plot(mask_path, tmp_path, capsys):
    from ssah_plugin.cli import main

    png = tmp_path / "classes.png"
    rc = main(["inspect", str(mask_path), "--json", "--plot", str(png), "--policy", "scu+cu:0.1"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    mask = Mask.load(mask_path)
    n = mask.n_units
    assert rep["units"] == n == 3 * (128 + 64)
    assert sum(rep["classes"].values()) == n and rep["classes"]["SCU"] == round(0.013 * n)
    assert set(rep["per_layer"]) == {"0", "1", "2"} and set(rep["per_layer"]["0"]) == {"mlp", "attn"}
    assert sum(r["SCU"] for r in rep["per_module_type"].values()) == rep["classes"]["SCU"]
    for pol in ("scu", "scu+cu6", "scu+cu", "ru-only", "scu+cu:0.1"):
        assert rep["frozen"][pol]["units"] == sum(int(s.sum()) for s in mask.frozen(pol))
    assert rep["frozen"]["scu"]["units"] == rep["classes"]["SCU"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_inspect_text_and_explicit_mask(mask_path, tmp_path, capsys):
    from ssah_plugin.cli import main

    assert main(["inspect", str(mask_path)]) == 0
    text = capsys.readouterr().out
    assert "SCU" in text and "layer   2" in text and "scu+cu6" in text
    explicit = Mask.from_units(tiny_model("llama"), {"model.layers.0.mlp": [1, 2]}).save(tmp_path / "e.safetensors")
    assert main(["inspect", str(explicit), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "classes" not in rep and rep["frozen"]["explicit"]["units"] == 2
    assert main(["inspect", str(explicit), "--plot", str(tmp_path / "x.png")]) == 2
