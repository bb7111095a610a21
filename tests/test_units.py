"""Unit mapping: zeroing a unit's weight slices == removing that unit's channel (proved per architecture family).

For every family, zeroing the slices the mapping assigns to unit ``j`` must give exactly the model output obtained by
zeroing the input channel(s) of the output projection (down_proj / o_proj / GPT-2 c_proj) with a forward pre-hook.
The input-projection slices and the output-projection slice are checked separately, so a wrong index in either side
(fused Phi-3 gate_up/qkv, GPT-2 Conv1D, GQA value rows) fails.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ssah_plugin.core.units import (
    ARCHITECTURES,
    ArchSpec,
    describe_units,
    register_architecture,
)
from ssah_plugin.errors import UnsupportedArchitectureError
from ssah_plugin.io.tiny import TINY_FAMILIES, tiny_model

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 128, 77]])



@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, family):
    if family not in models:
        m = tiny_model(family, seed=3)
        # Non-zero biases so that a missed bias entry changes the output (tiny models initialise biases to 0).
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        m.eval()
        models[family] = m
    return models[family]


@torch.no_grad()
def _logits(model, hook_module: nn.Module | None = None, channels: torch.Tensor | None = None, layout="linear"):
    handle = None
    if hook_module is not None:
        def pre(_mod, args):
            x = args[0].clone()
            x[..., channels] = 0
            return (x,) + args[1:]

        handle = hook_module.register_forward_pre_hook(pre)
    try:
        return model(input_ids=IDS).logits
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def _zeroed(model, slices, unit: int):
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    for s in slices:
        params[s.name].index_fill_(s.axis, s.index[unit], 0)
    return m


def _kv_shared_channels(model, group, unit: int) -> torch.Tensor:
    """o_proj input channels whose value row is among unit ``unit``'s, computed from the config (not the mapping)."""
    cfg = model.config
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d = group.n_units * group.channels_per_unit
    head_dim = d // n_heads
    per_kv = n_heads // n_kv
    ch = torch.arange(d)
    kv_of = (ch // head_dim) // per_kv
    mine = torch.arange(unit * group.channels_per_unit, (unit + 1) * group.channels_per_unit)
    sel = torch.zeros(d, dtype=torch.bool)
    for c in mine.tolist():
        sel |= (kv_of == kv_of[c]) & (ch % head_dim == c % head_dim)
    return torch.nonzero(sel).squeeze(1)


def _check_group(model, group, unit: int):
    base = _logits(model)
    score_mod = model.get_submodule(group.score_module)
    own = torch.arange(unit * group.channels_per_unit, (unit + 1) * group.channels_per_unit)
    out_slices = [s for s in group.slices if s.module == group.score_module]
    in_slices = [s for s in group.slices if s.module != group.score_module]
    assert out_slices and in_slices
    # output projection slice alone == removing exactly this unit's channel(s)
    want = _logits(model, score_mod, own)
    got = _logits(_zeroed(model, out_slices, unit))
    assert not torch.equal(want, base), "removing the channel must change the output (test must be able to fail)"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # input projection slices alone == removing the channels they feed (for GQA: every head sharing the value row)
    feeds = own if group.kind == "mlp" else _kv_shared_channels(model, group, unit)
    want_in = _logits(model, score_mod, feeds)
    got_in = _logits(_zeroed(model, in_slices, unit))
    torch.testing.assert_close(got_in, want_in, rtol=1e-5, atol=1e-6)
    # everything together
    got_all = _logits(_zeroed(model, group.slices, unit))
    torch.testing.assert_close(got_all, want_in, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_channel_mapping_equals_channel_removal(models, family):
    model = _model(models, family)
    groups = describe_units(model)
    assert [g.kind for g in groups] == ["mlp", "attn"] * model.config.num_hidden_layers
    mlp = groups[2]  # layer 1
    attn = groups[3]
    assert mlp.n_units == 128 and attn.n_units == 64
    for unit in (0, 77):
        _check_group(model, mlp, unit)
    for unit in (5, 63):  # 5: first KV head; 63: last channel (second KV head under GQA)
        _check_group(model, attn, unit)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "qwen2"])
def test_head_mapping_equals_head_removal(models, family):
    model = _model(models, family)
    groups = describe_units(model, granularity="head")
    attn = groups[1]
    assert attn.n_units == 4 and attn.channels_per_unit == 16 and attn.granularity == "head"
    for unit in (0, 3):
        _check_group(model, attn, unit)


def test_fused_and_conv1d_indices_are_what_we_expect(models):
    phi3 = describe_units(_model(models, "phi3"))
    gate_up = next(s for s in phi3[0].slices if s.module.endswith("gate_up_proj"))
    assert gate_up.axis == 0 and gate_up.index[7].tolist() == [7, 7 + 128]
    qkv = next(s for s in phi3[1].slices if s.module.endswith("qkv_proj"))
    assert qkv.index[3].tolist() == [2 * 64 + 3]  # value block after q (64) and k (4 kv heads x 16)
    gpt2 = describe_units(_model(models, "gpt2"))
    c_fc = next(s for s in gpt2[0].slices if s.module.endswith("c_fc") and s.param == "weight")
    assert c_fc.axis == 1 and c_fc.shape == (64, 128)  # Conv1D weight is [in, out]: output neurons are columns
    c_attn = next(s for s in gpt2[1].slices if s.module.endswith("c_attn") and s.param == "weight")
    assert c_attn.axis == 1 and c_attn.index[0].tolist() == [128]
    llama = describe_units(_model(models, "llama"))
    v = next(s for s in llama[1].slices if s.module.endswith("v_proj"))
    # 4 query heads of 16 channels over 2 KV heads: channels of heads 0,1 read KV head 0, heads 2,3 KV head 1
    assert v.index[:, 0].tolist()[::16] == [0, 0, 16, 16]


def test_embeddings_norms_and_lm_head_are_never_units(models):
    model = tiny_model("llama", tie_word_embeddings=True)
    names = {s.module for g in describe_units(model) for s in g.slices}
    assert not any(("embed" in n) or ("norm" in n) or ("lm_head" in n) for n in names)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bad_granularity():
    with pytest.raises(ValueError, match="granularity"):
        describe_units(tiny_model("llama"), granularity="neuron")


# ---------------------------------------------------------------------------------------------- other architectures
def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)
    torch.manual_seed(0)
    return OPTForCausalLM(cfg).eval()


OPT_SPEC = ArchSpec(layers="model.decoder.layers", mlp="", mlp_in=("fc1",), mlp_out="fc2", attn="self_attn",
                    attn_v="v_proj", attn_out="out_proj")


@pytest.fixture
def opt_registered():
    register_architecture("opt", OPT_SPEC)
    try:
        yield
    finally:
        ARCHITECTURES.pop("opt", None)


def test_unsupported_architecture_error_names_the_fix():
    with pytest.raises(UnsupportedArchitectureError) as e:
        describe_units(_tiny_opt())
    msg = str(e.value)
    assert "'opt' is not supported" in msg and "register_architecture" in msg and "ArchSpec" in msg


def test_register_architecture_opt(opt_registered, models):
    model = _tiny_opt()
    groups = describe_units(model)
    assert [g.name for g in groups[:2]] == ["model.decoder.layers.0", "model.decoder.layers.0.self_attn"]
    mlp, attn = groups[2], groups[3]
    assert mlp.score_module == "model.decoder.layers.1.fc2"
    # OPT has biases everywhere: fc1 bias and v_proj bias entries belong to the units
    assert {s.name.rsplit(".", 1)[-1] for s in mlp.slices} == {"weight", "bias"}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    # ReLU: pick a neuron that fires on this input (a dead one cannot show anything)
    acts = {}
    h = model.get_submodule(mlp.score_module).register_forward_pre_hook(lambda m, a: acts.setdefault("x", a[0]))
    _logits(model)
    h.remove()
    x = acts["x"]
    unit = int(x.reshape(-1, x.shape[-1]).abs().sum(0).argmax())
    _check_group(model, mlp, unit)
    _check_group(model, attn, 40)
    # the registered architecture goes through the whole path: mask, validation, enforcement
    from ssah_plugin import Mask, SSAHOptimizer

    model.train()
    mask = Mask.from_units(model, {mlp.name: [unit, 3], attn.name: [40]})
    frozen_w = model.get_submodule(mlp.score_module).weight.detach()[:, [3, unit]].clone()
    opt = SSAHOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, mask)
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.max_drift() == 0.0
    assert torch.equal(model.get_submodule(mlp.score_module).weight[:, [3, unit]], frozen_w)
    opt.remove_hooks()
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("opt", OPT_SPEC)
    with pytest.raises(TypeError):
        register_architecture("opt2", {"layers": "x"})  # type: ignore[arg-type]


def test_renamed_module_wrong_spec_is_clear(opt_registered):
    register_architecture("opt", ArchSpec(layers="model.decoder.blocks", mlp="", mlp_in=("fc1",), mlp_out="fc2",
                                          attn="self_attn", attn_v="v_proj", attn_out="out_proj"), overwrite=True)
    with pytest.raises(UnsupportedArchitectureError, match="model.decoder.blocks"):
        describe_units(_tiny_opt())
    register_architecture("opt", ArchSpec(layers="model.decoder.layers", mlp="", mlp_in=("fc_in",),
                                          mlp_out="fc2", attn="self_attn", attn_v="v_proj", attn_out="out_proj"),
                          overwrite=True)
    with pytest.raises(UnsupportedArchitectureError, match="fc_in"):
        describe_units(_tiny_opt())
