"""PEFT recognition by PEFT's own classes, not by class names; the framework-free layout refuses foreign wrappers.

``ssah_plugin.core.peft_layout`` / ``peft_rules`` never import ``peft``; ``ssah_plugin.hosts.peft.check_peft_setup``
checks layer classes with ``isinstance`` against ``peft``'s ``LoraLayer``, and ``unwrap_model`` recognises
``PeftModel`` with ``isinstance``. Each test builds an impostor that the old string checks would have accepted (or
a real PEFT object they would have needed), so it fails if recognition goes back to names.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from ssah_plugin.core.mask import Mask  # noqa: E402
from ssah_plugin.core.peft_layout import base_module, find_weight, is_tuner_layer  # noqa: E402
from ssah_plugin.core.plan import plan_frozen_slices  # noqa: E402
from ssah_plugin.core.units import describe_units, unwrap_model  # noqa: E402
from ssah_plugin.errors import UnsupportedSetupError  # noqa: E402
from ssah_plugin.hosts.peft import check_peft_setup, peft_configs  # noqa: E402
from ssah_plugin.io.tiny import tiny_model  # noqa: E402

FROZEN = [1, 5]


class LoraLookalike(nn.Module):
    """Plain-LoRA structure (base_layer, lora_A / lora_B module dicts) without being PEFT's LoraLayer."""

    def __init__(self, base: nn.Linear, r: int = 2) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        nn.init.zeros_(self.lora_B["default"].weight)
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class NotAWrapper(nn.Module):
    """A module that only wraps by attribute (``base_layer``) without LoRA factors."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base

    def forward(self, x):
        return self.base_layer(x)


def _mask(model):
    return Mask.from_units(model, {g.name: FROZEN for g in describe_units(model)})


def test_lookalike_layer_passes_structure_but_not_the_class_check():
    model = tiny_model("llama")
    mask = _mask(model)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = LoraLookalike(mlp.down_proj)
    assert is_tuner_layer(mlp.down_proj) and base_module(mlp.down_proj) is mlp.down_proj.base_layer
    names = {s.name for s in plan_frozen_slices(mask, model)}  # structurally plain LoRA: planned
    assert "model.layers.0.mlp.down_proj.lora_A.default.weight" in names
    with pytest.raises(UnsupportedSetupError, match=r"model.layers.0.mlp.down_proj is wrapped by LoraLookalike"):
        check_peft_setup(model)


def test_foreign_wrapper_refused_by_planning():
    model = tiny_model("llama")
    mask = _mask(model)
    mlp = model.model.layers[1].mlp
    mlp.up_proj = NotAWrapper(mlp.up_proj)
    assert find_weight(model, "model.layers.1.mlp.up_proj", "weight") is mlp.up_proj.base_layer.weight
    with pytest.raises(UnsupportedSetupError, match="not plain LoRA"):
        plan_frozen_slices(mask, model)


def test_unwrap_uses_peft_classes_not_names():
    model = tiny_model("llama")
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"]))
    assert unwrap_model(pm) is model

    class PeftImpostor(nn.Module):  # a name the old check ("Peft*") would have unwrapped
        def __init__(self, inner):
            super().__init__()
            self.base_model = nn.Module()
            self.base_model.model = inner

    impostor = PeftImpostor(tiny_model("llama"))
    assert unwrap_model(impostor) is impostor


def test_configs_found_by_class_on_every_path():
    model = tiny_model("llama")
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj"]))
    assert list(peft_configs(pm)) == ["default"]
    # transformers' PEFT integration (model.add_adapter) keeps the configs in model.peft_config and sets
    # _hf_peft_config_loaded; set them as it does (its add_adapter needs a newer peft than some installs have)
    other = tiny_model("llama")
    other.peft_config = {"default": LoraConfig(r=2, target_modules=["up_proj"], use_dora=True)}
    other._hf_peft_config_loaded = True
    assert list(peft_configs(other)) == ["default"]
    with pytest.raises(UnsupportedSetupError, match="use_dora"):
        check_peft_setup(other)
    other._hf_peft_config_loaded = False  # a dict named peft_config on a model without the flag is not PEFT's
    assert peft_configs(other) == {}


def test_no_peft_import_without_peft_objects():
    """Without peft imported, the checks and planning pass on a plain model and never import it."""
    code = ("import sys, torch; from ssah_plugin.hosts.peft import check_peft_setup; "
            "from ssah_plugin.core.plan import plan_frozen_slices; from ssah_plugin.core.mask import Mask; "
            "from ssah_plugin.io.tiny import tiny_model; m = tiny_model('llama'); "
            "mask = Mask.from_units(m, {'model.layers.0.mlp': [1]}); check_peft_setup(m); "
            "assert plan_frozen_slices(mask, m); print('peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_lora_layers_still_plan_after_check():
    model = tiny_model("llama")
    mask = _mask(model)
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["down_proj", "up_proj"]))
    check_peft_setup(pm)
    slices = {s.name: s for s in plan_frozen_slices(mask, pm)}
    a = slices["model.layers.0.mlp.down_proj.lora_A.default.weight"]
    b = slices["model.layers.0.mlp.up_proj.lora_B.default.weight"]
    assert a.fill == 0.0 and a.axis == 1 and b.fill == 0.0 and b.axis == 0
    assert torch.equal(a.index, torch.tensor(FROZEN))
