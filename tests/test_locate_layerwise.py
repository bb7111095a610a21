"""Layer-by-layer locate gives the same scores as whole-model locate (single file and sharded checkpoints)."""
from __future__ import annotations

import pytest
import torch

from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer
from ssah_plugin.locate import LocateConfig, locate, locate_layerwise, locate_pretrained
from ssah_plugin.locate.layerwise import checkpoint_bytes, open_weights

CFG = dict(max_samples=5, batch_size=2, max_length=80, progress=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _save(tmp_path_factory, family, shard):
    model = tiny_model(family).eval()
    path = tmp_path_factory.mktemp(f"{family}_{'sharded' if shard else 'single'}")
    model.save_pretrained(path, max_shard_size="60KB" if shard else "1GB")
    return model, path


@pytest.mark.parametrize("family,shard", [("llama", True), ("llama", False), ("gpt2", True), ("gemma2", True)])
def test_layerwise_equals_whole_model(tmp_path_factory, tok, family, shard):
    model, path = _save(tmp_path_factory, family, shard)
    assert (path / "model.safetensors.index.json").is_file() == shard
    for granularity in ("channel",) if family != "llama" else ("channel", "head"):
        cfg = LocateConfig(granularity=granularity, **CFG)
        whole = locate(model, tok, config=cfg)
        lw = locate_layerwise(path, tok, safety="shipped:safety_refusals.jsonl",
                              utility="shipped:benign_instructions.jsonl", config=cfg)
        assert lw.method["mode"] == "layer-by-layer"
        for kind in ("safety", "utility", "safety_z", "utility_z"):
            for a, b in zip(whole.scores[kind], lw.scores[kind]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)
        assert all(torch.equal(a, b) for a, b in zip(whole.classes, lw.classes))
        assert list(lw.fingerprint) == list(whole.fingerprint)
        assert lw.config_hash == whole.config_hash and lw.model_class == whole.model_class
        lw.validate(model)  # the mask fits the real model, fingerprint included


def test_locate_pretrained_picks_layerwise_when_forced(tmp_path_factory, tok):
    model, path = _save(tmp_path_factory, "llama", True)
    tok.save_pretrained(path)
    mask = locate_pretrained(str(path), config=LocateConfig(layerwise="on", **CFG))
    assert mask.method["mode"] == "layer-by-layer"
    whole = locate_pretrained(str(path), config=LocateConfig(layerwise="off", **CFG))
    assert whole.method["mode"] == "whole-model"
    for a, b in zip(whole.scores["safety"], mask.scores["safety"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)
    assert checkpoint_bytes(path) == sum(p.numel() * 4 for p in model.parameters())


def test_layerwise_refuses_generation_options_and_bin_checkpoints(tmp_path, tok):
    with pytest.raises(UnsupportedSetupError, match="own_refusals and auto"):
        locate_layerwise(tmp_path, tok, safety="x", utility="y", config=LocateConfig(own_refusals=True))
    with pytest.raises(UnsupportedSetupError, match="safetensors"):
        open_weights(tmp_path)
