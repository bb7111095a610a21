"""LocateConfig: the method / runtime split, what the mask records, old masks, and the CLI built from the fields."""
from __future__ import annotations

import argparse
import copy
import dataclasses

import pytest
import torch

from ssah_plugin.core.mask import Mask
from ssah_plugin.core.units import describe_units
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer
from ssah_plugin.locate import LocateConfig, build_mask, locate, reclassify
from ssah_plugin.locate.config import METHOD_FIELDS, RUNTIME_FIELDS


def test_every_field_is_method_or_runtime_and_documented():
    names = [f.name for f in dataclasses.fields(LocateConfig)]
    assert sorted(METHOD_FIELDS + RUNTIME_FIELDS) == sorted(names) and not set(METHOD_FIELDS) & set(RUNTIME_FIELDS)
    assert set(RUNTIME_FIELDS) == {"device", "batch_size", "layerwise", "progress"}
    for f in dataclasses.fields(LocateConfig):
        assert f.metadata["help"] and f.metadata["group"], f.name


def test_mask_records_the_method_only_and_runtime_does_not_change_it():
    model, tok = tiny_model("llama").eval(), tiny_tokenizer()
    common = dict(max_samples=4, max_length=64, seed=3)
    a = locate(model, tok, config=LocateConfig(batch_size=1, progress=False, **common))
    b = locate(model, tok, config=LocateConfig(batch_size=4, progress=True, device="cpu", **common))
    assert set(a.method["config"]) == set(METHOD_FIELDS)
    assert not set(a.method["config"]) & set(RUNTIME_FIELDS)
    assert a.method == b.method  # runtime settings leave no trace in the mask
    assert a.method["config"] == LocateConfig(**common).method_dict()
    for x, y in zip(a.scores["safety"], b.scores["safety"]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-15)  # batching: float32 rounding only


def test_config_round_trips_through_the_mask_and_old_masks_still_work(tmp_path):
    cfg = LocateConfig(max_samples=7, scu=0.02, class_order=("RU", "SCU", "UCU"), auto_scu_grid=(0.01, 0.02))
    assert LocateConfig.from_dict(cfg.method_dict(), progress=False) == dataclasses.replace(cfg, progress=False)
    model = tiny_model("llama")
    groups = describe_units(model)
    torch.manual_seed(0)
    s = [torch.rand(g.n_units, dtype=torch.float64) for g in groups]
    u = [torch.rand(g.n_units, dtype=torch.float64) for g in groups]
    mask = build_mask(model, groups, s, u, cfg)
    back = Mask.load(mask.save(tmp_path / "new.safetensors"))
    assert LocateConfig.from_dict(back.method["config"]) == cfg  # runtime fields: the defaults
    # a mask written before the split recorded every field, runtime ones included (and maybe keys we drop later)
    old = copy.deepcopy(mask)
    old.method["config"] = dict(cfg.to_dict(), device="cuda:0", progress=True, retired_option=1)
    old = Mask.load(old.save(tmp_path / "old.safetensors"))
    assert LocateConfig.from_dict(old.method["config"]).device == "cuda:0"
    relabelled = reclassify(old, scu=0.05)
    assert relabelled.summary()["classes"]["SCU"] == round(0.05 * mask.n_units)
    assert relabelled.method["config"]["class_order"] == ["RU", "SCU", "UCU"]


def _parse(*argv):
    from ssah_plugin.cli import locate as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--model", "m", "-o", "o.safetensors", *argv])
    return p, cli.config_from_args(args)


def test_cli_defaults_and_help_come_from_the_fields():
    p, cfg = _parse()
    assert cfg == LocateConfig()
    options = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(LocateConfig):
        action = options[f.name]
        assert action.default == f.default, f.name
        assert f.metadata["help"].replace("%", "%%") in action.help, f.name
        assert action.option_strings[0] == "--" + f.name.replace("_", "-")


def test_cli_parses_every_kind_of_field():
    _, cfg = _parse("--max-samples", "0", "--scu", "1.5%", "--ru", "0.2", "--class-order", "scu,ucu,ru",
                    "--auto-scu-grid", "0.01,2%", "--no-progress", "--decision-units", "--tokens", "all",
                    "--dtype", "bfloat16", "--batch-size", "3", "--max-length", "64")
    assert cfg.max_samples is None and cfg.scu == pytest.approx(0.015) and cfg.ru == 0.2
    assert cfg.class_order == ("SCU", "UCU", "RU") and cfg.auto_scu_grid == (0.01, 0.02)
    assert not cfg.progress and cfg.decision_units and cfg.tokens == "all" and cfg.dtype == "bfloat16"
    assert cfg.batch_size == 3 and cfg.max_length == 64
    with pytest.raises(SystemExit):
        _parse("--scu", "2")  # not a fraction
    from ssah_plugin.errors import DataError

    with pytest.raises(DataError, match="class_order"):
        _parse("--class-order", "SCU,RU")
