"""PEFT / LoRA: frozen units stay bit-exact in the adapter and after ``merge_and_unload``.

Plain PyTorch training loops here (fast); the TRL trainers are in ``test_peft_trl.py``. Every exactness check
compares the merged model with an untouched copy of the base with ``torch.equal`` on the unit's full slices, and
checks that unfrozen units did move (so the test can fail both ways).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from ssah_plugin.core.mask import Mask  # noqa: E402
from ssah_plugin.core.peft_layout import adapter_slices, saved_copies  # noqa: E402
from ssah_plugin.core.plan import plan_frozen_slices  # noqa: E402
from ssah_plugin.core.units import describe_units  # noqa: E402
from ssah_plugin.errors import UnsupportedSetupError  # noqa: E402
from ssah_plugin.hosts.enforce import build_enforcer  # noqa: E402
from ssah_plugin.hosts.peft import compare_frozen_units  # noqa: E402
from ssah_plugin.io.adapters import merge_adapter_state  # noqa: E402
from ssah_plugin.io.tiny import tiny_model  # noqa: E402

FROZEN = [1, 5, 6]  # frozen units in every group (MLP neurons / attention channels)
TARGETS = {
    "llama": ["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj", "o_proj"],
    "qwen2": ["gate_proj", "up_proj", "down_proj", "v_proj", "o_proj"],
    "gpt2": ["c_fc", "c_proj", "c_attn"],  # Conv1D (fan_in_fan_out)
    "phi3": ["gate_up_proj", "down_proj", "qkv_proj", "o_proj"],  # fused projections
}


def make(family: str = "llama", **lora_kw):
    """(base copy, peft model, mask) with FROZEN units frozen in every group."""
    model = tiny_model(family)
    base = copy.deepcopy(model)
    mask = Mask.from_units(model, {g.name: FROZEN for g in describe_units(model)})
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2")
    kw.update(lora_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pm = get_peft_model(model, LoraConfig(**kw))
    return base, pm, mask


def train(pm, mask=None, steps: int = 3, lr: float = 1e-2, seed: int = 0):
    """A few AdamW steps (weight decay on) with the freeze engine in the loop (``mask=None``: no enforcement)."""
    torch.manual_seed(seed)
    eng = None
    if mask is not None:
        _, eng = build_enforcer(mask, pm)
        eng.attach()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    x = torch.randint(3, 500, (2, 16))
    for _ in range(steps):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        if eng is not None:
            eng.after_step()
        opt.zero_grad()
    if eng is not None:
        assert eng.max_drift() == 0.0
        eng.detach()
    return eng


def assert_exact(mask, base, merged):
    rep = compare_frozen_units(mask, base, merged)
    assert rep["checked"] > 0
    assert rep["mismatched"] == [], rep
    assert rep["changed_unfrozen"] > 0, "nothing trained: the test would pass vacuously"
    return rep


# ---------------------------------------------------------------------------------------------------- mapping
def test_adapter_slices_map_roles_to_lora_factors():
    _, pm, mask = make("llama")
    slices = plan_frozen_slices(mask, pm)
    by_name = {s.name: s for s in slices}
    b = by_name["model.layers.0.mlp.gate_proj.lora_B.default.weight"]
    assert (b.axis, b.fill, b.index.tolist()) == (0, 0.0, FROZEN)
    a = by_name["model.layers.0.mlp.down_proj.lora_A.default.weight"]
    assert (a.axis, a.fill, a.index.tolist()) == (1, 0.0, FROZEN)
    assert "model.layers.0.self_attn.v_proj.lora_B.default.weight" in by_name
    assert "model.layers.0.self_attn.o_proj.lora_A.default.weight" in by_name
    # q_proj carries no unit: no adapter slice for it; base weights are listed but not trainable
    assert not any("q_proj" in n for n in by_name)
    assert all(not s.param.requires_grad for s in slices if s.fill is None)
    # a base bias slice gives no adapter slice (the lora_B bias comes with the weight rows)
    layer = pm.base_model.model.model.layers[0].mlp.gate_proj
    assert adapter_slices(layer, "model.layers.0.mlp.gate_proj.bias", "out", torch.tensor([1])) == []


def test_gpt2_conv1d_roles_not_physical_axes():
    _, pm, mask = make("gpt2")
    by_name = {s.name: s for s in plan_frozen_slices(mask, pm)}
    # Conv1D base weight c_fc is [in, out]: the unit is a column there, but a row of lora_B (role "out")
    assert by_name["transformer.h.0.mlp.c_fc.weight"].axis == 1
    assert by_name["transformer.h.0.mlp.c_fc.lora_B.default.weight"].axis == 0
    assert by_name["transformer.h.0.mlp.c_proj.lora_A.default.weight"].axis == 1


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_merged_equals_base_on_frozen_units(family):
    base, pm, mask = make(family)
    train(pm, mask)
    for s in plan_frozen_slices(mask, pm):
        if s.fill == 0.0:
            assert not s.param.index_select(s.axis, s.index).any(), s.name
    mlp_in = pm.base_model.model.get_submodule(describe_units(base)[0].slices[0].module)  # gate / c_fc / gate_up
    assert mlp_in.lora_B["default"].weight.abs().sum() > 0  # the other rows of B really moved
    assert_exact(mask, base, pm.merge_and_unload())


def test_without_enforcement_frozen_units_move():
    """Negative control: the same training without the engine changes the frozen units."""
    base, pm, mask = make("llama")
    train(pm, None)
    rep = compare_frozen_units(mask, base, pm.merge_and_unload())
    assert len(rep["mismatched"]) > 0


def test_rslora_patterns_dropout_are_plain_lora():
    base, pm, mask = make("llama", use_rslora=True, lora_dropout=0.1, rank_pattern={"down_proj": 2},
                          alpha_pattern={"down_proj": 4}, init_lora_weights="gaussian")
    train(pm, mask)
    assert_exact(mask, base, pm.merge_and_unload())


def test_random_b_init_is_zeroed_with_warning():
    base, pm, mask = make("llama", init_lora_weights=False)
    with pytest.warns(RuntimeWarning, match="already changes frozen units"):
        train(pm, mask)
    assert_exact(mask, base, pm.merge_and_unload())


def test_several_adapters_all_covered():
    base, pm, mask = make("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pm.add_adapter("second", LoraConfig(r=2, target_modules=["down_proj", "v_proj"], init_lora_weights="gaussian"))
        pm.add_adapter("idle", LoraConfig(r=2, target_modules=["up_proj"]))
    pm.base_model.set_adapter(["default", "second"])  # two active adapters train together
    names = {s.name for s in plan_frozen_slices(mask, pm)}
    assert "model.layers.1.mlp.down_proj.lora_A.second.weight" in names
    assert "model.layers.1.mlp.up_proj.lora_B.idle.weight" in names  # inactive adapters are listed too
    train(pm, mask)
    idle = pm.base_model.model.model.layers[0].mlp.up_proj.lora_B["idle"].weight
    assert not idle.requires_grad and not idle.any()
    assert_exact(mask, base, pm.merge_and_unload(adapter_names=["default", "second", "idle"]))


def test_inactive_adapter_that_changes_frozen_units_warns():
    _, pm, mask = make("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pm.add_adapter("old", LoraConfig(r=2, target_modules=["up_proj"], init_lora_weights=False))
    with pytest.warns(RuntimeWarning, match="inactive LoRA adapter 'old'"):
        plan_frozen_slices(mask, pm)


@pytest.mark.parametrize("saved", ["down_proj", "mlp"])
def test_modules_to_save_copies_are_frozen_like_full_finetuning(saved, tmp_path):
    targets = ["v_proj", "o_proj"] if saved == "mlp" else ["gate_proj", "up_proj", "v_proj", "o_proj"]
    base, pm, mask = make("llama", target_modules=targets, modules_to_save=[saved])
    root = pm.base_model.model
    copies = saved_copies(root, "model.layers.0.mlp.down_proj")
    assert copies is not None and sorted(c for _, _, c in copies) == [False, True]
    assert saved_copies(root, "model.layers.0.self_attn.o_proj") is None
    by_name = {s.name: s for s in plan_frozen_slices(mask, pm)}
    infix = "mlp.modules_to_save.default.down_proj" if saved == "mlp" else "mlp.down_proj.modules_to_save.default"
    copy_slice = by_name[f"model.layers.0.{infix}.weight"]
    assert copy_slice.fill is None and copy_slice.param.requires_grad and copy_slice.axis == 1
    train(pm, mask)
    pm.save_pretrained(tmp_path / "adapter")  # the saved adapter holds the copies; merged from disk: still exact
    from_disk = merge_adapter_state(copy.deepcopy(base), tmp_path / "adapter")
    rep = assert_exact(mask, base, pm.merge_and_unload())
    assert rep["changed_unfrozen"] >= 4
    assert compare_frozen_units(mask, base, from_disk) == rep


def test_bias_all_and_lora_bias_keep_frozen_bias_entries():
    """qwen2 has a v_proj bias: PEFT bias='all' trains base biases, lora_bias=True adds a bias to lora_B."""
    base, pm, mask = make("qwen2", bias="all", lora_bias=True, target_modules=["q_proj", "v_proj"])
    names = {s.name for s in plan_frozen_slices(mask, pm)}
    assert "model.layers.0.self_attn.v_proj.lora_B.default.bias" in names
    assert pm.base_model.model.model.layers[0].self_attn.v_proj.base_layer.bias.requires_grad
    train(pm, mask)
    merged = pm.merge_and_unload()
    assert_exact(mask, base, merged)
    b0 = base.model.layers[0].self_attn.v_proj.bias
    b1 = merged.model.layers[0].self_attn.v_proj.bias
    assert torch.equal(b0[FROZEN], b1[FROZEN]) and not torch.equal(b0, b1)


def test_untargeted_units_are_safe():
    """Only q/k targeted: no adapter touches a unit; the merged model equals the base on every unit slice."""
    base, pm, mask = make("llama", target_modules=["q_proj", "k_proj"])
    assert all(s.fill is None for s in plan_frozen_slices(mask, pm))
    train(pm, mask)
    rep = compare_frozen_units(mask, base, pm.merge_and_unload())
    assert rep["mismatched"] == [] and rep["changed_unfrozen"] == 0


def test_low_precision_frozen_base():
    """A bf16 base with requires_grad=False (the quantized-base situation: only the fp32 adapter trains)."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    base = copy.deepcopy(model)
    mask = Mask.from_units(model, {g.name: FROZEN for g in describe_units(model)})
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS["llama"]))
    lora_a = pm.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight
    assert lora_a.dtype == torch.float32  # PEFT keeps adapters in fp32 (autocast_adapter_dtype)
    train(pm, mask)
    assert_exact(mask, base, pm.merge_and_unload())


# ---------------------------------------------------------------------------------------------------- refusals
def _refused_models():
    from peft import (
        AdaLoraConfig,
        IA3Config,
        LoHaConfig,
        LoKrConfig,
        PrefixTuningConfig,
        VeraConfig,
    )

    t = ["gate_proj", "down_proj"]
    return [
        ("dora", LoraConfig(r=4, target_modules=t, use_dora=True), "use_dora"),
        ("pissa", LoraConfig(r=4, target_modules=t, init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        ("olora", LoraConfig(r=4, target_modules=t, init_lora_weights="olora"), "init_lora_weights='olora'"),
        ("replication", LoraConfig(r=4, target_modules=t, layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
        ("loha", LoHaConfig(r=4, target_modules=t), "LOHA"),
        ("lokr", LoKrConfig(r=4, target_modules=t), "LOKR"),
        ("ia3", IA3Config(target_modules=t, feedforward_modules=["down_proj"]), "IA3"),
        ("vera", VeraConfig(r=4, target_modules=["gate_proj", "up_proj"]), "VERA"),
        ("adalora", AdaLoraConfig(r=4, target_modules=t, total_step=10), "ADALORA"),
        ("prefix", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "PREFIX_TUNING"),
    ]


@pytest.mark.parametrize("case", range(10), ids=lambda i: ["dora", "pissa", "olora", "replication", "loha", "lokr",
                                                           "ia3", "vera", "adalora", "prefix"][i])
def test_unsupported_peft_setups_are_refused_at_setup(case):
    model = tiny_model("llama")
    mask = Mask.from_units(model, {g.name: FROZEN for g in describe_units(model)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name, cfg, needle = _refused_models()[case]
        pm = get_peft_model(model, cfg)
    with pytest.raises(UnsupportedSetupError, match="Fix") as ei:
        build_enforcer(mask, pm, check_fingerprint=False)
    assert needle in str(ei.value)


def test_layer_level_refusals_without_config():
    """adapter_slices refuses DoRA layers and merged layers even when no peft_config is visible.

    PEFT >= 0.16 marks a DoRA layer with a ``lora_variant``; PEFT 0.15 has no variants, and the layer is refused for
    its extra ``lora_magnitude_vector`` parameter instead (scripts/compat.sh runs PEFT 0.15)."""
    _, pm, _ = make("llama", use_dora=True)
    layer = pm.base_model.model.model.layers[0].mlp.gate_proj
    with pytest.raises(UnsupportedSetupError, match="variant|lora_magnitude_vector"):
        adapter_slices(layer, "model.layers.0.mlp.gate_proj.weight", "out", torch.tensor([1]))
    _, pm, mask = make("llama")
    pm.merge_adapter()
    with pytest.raises(UnsupportedSetupError, match="unmerge"):
        plan_frozen_slices(mask, pm)


# ---------------------------------------------------------------------------------------------------- adapter on disk
def test_merge_adapter_state_from_directories(tmp_path):
    base, pm, mask = make("llama")
    train(pm, mask)
    base.save_pretrained(tmp_path / "base")
    pm.save_pretrained(tmp_path / "adapter")
    merged = merge_adapter_state(tmp_path / "base", tmp_path / "adapter")
    assert_exact(mask, base, merged)
    assert torch.equal(merged.model.layers[0].mlp.down_proj.weight,
                       pm.merge_and_unload().model.layers[0].mlp.down_proj.weight)


def test_merge_adapter_state_refuses_dora_and_non_adapter(tmp_path):
    base, pm, _ = make("llama", use_dora=True)
    pm.save_pretrained(tmp_path / "dora")
    with pytest.raises(UnsupportedSetupError, match="use_dora"):
        merge_adapter_state(copy.deepcopy(base), tmp_path / "dora")
    with pytest.raises(UnsupportedSetupError, match="adapter_config.json"):
        merge_adapter_state(base, tmp_path)


# ---------------------------------------------------------------------------------------------------- quantized base
def _delta_is_zero_on_frozen(pm, mask):
    """Every LoRA layer's B @ A (what merging adds) is exactly zero on frozen units, and not zero elsewhere."""
    from ssah_plugin.core.peft_layout import find_module

    root = pm.base_model.model
    moved = 0
    for g, frozen in zip(mask.groups, mask.frozen(None)):
        for s in g.slices:
            layer = find_module(root, s.module)
            if s.param != "weight" or not hasattr(layer, "lora_A"):
                continue
            delta = layer.get_delta_weight("default")  # logical [out, in]
            axis = 0 if s.role == "out" else 1
            assert not delta.index_select(axis, s.index[frozen].reshape(-1)).any(), s.name
            moved += bool(delta.index_select(axis, s.index[~frozen].reshape(-1)).any())
    assert moved > 0


def test_packed_quantized_base_validates_and_plans():
    """Offline stand-in for a 4-bit base: a packed uint8 weight with ``quant_state.shape`` and requires_grad=False.

    The mask validates against the logical shape, the base slice is skipped (not trainable) and the adapter slices
    are planned as for a float base.
    """
    from types import SimpleNamespace

    _, pm, mask = make("llama")
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    w = layer.base_layer.weight
    packed = torch.nn.Parameter(torch.zeros(w.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=w.shape)
    layer.base_layer.weight = packed
    _, eng = build_enforcer(mask, pm)
    names = {s.name for s in eng.slices}
    assert "model.layers.0.mlp.down_proj.lora_A.default.weight" in names
    assert "model.layers.0.mlp.down_proj.weight" not in names  # frozen base: nothing to enforce


def test_bitsandbytes_4bit_base(tmp_path):
    """LoRA on a real NF4 base (bitsandbytes, CPU backend): only the adapter trains; B @ A is zero on frozen units.

    ``merge_and_unload`` into a 4-bit model re-quantizes whole 64-element blocks, so it is not bit-exact on frozen
    input columns whatever the adapter does; merge into a float copy of the base instead (docs/peft.md).
    """
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = AutoModelForCausalLM.from_pretrained(
            tmp_path, device_map="cpu",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    mask = Mask.from_units(tiny_model("llama"), {g.name: FROZEN for g in describe_units(tiny_model("llama"))})
    pm = get_peft_model(q, LoraConfig(r=4, target_modules=TARGETS["llama"]))
    assert type(pm.base_model.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    train(pm, mask)
    _delta_is_zero_on_frozen(pm, mask)
