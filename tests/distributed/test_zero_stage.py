"""Single-process checks of the one ZeRO-stage query and of the DeepSpeed version gate (no process group needed).

The stage of live Trainer / accelerate / engine objects is also recorded by every 2-rank scenario of ``worker.py``
and asserted in ``test_zero.py``.
"""
from __future__ import annotations

import json

import pytest
import torch

from ssah_plugin import UnsupportedSetupError
from ssah_plugin.hosts.zero import (
    SUPPORTED_DEEPSPEED,
    check_deepspeed_version,
    is_zero3_partitioned,
    zero_stage,
)


def test_configs_plain_objects_and_none():
    assert zero_stage(None) is None
    assert zero_stage({"zero_optimization": {"stage": 3}}) == 3
    assert zero_stage({"zero_optimization": {"stage": 1, "overlap_comm": False}}) == 1
    assert zero_stage({"bf16": {"enabled": True}}) == 0  # a DeepSpeed config without ZeRO
    assert zero_stage(torch.nn.Linear(2, 2)) is None
    assert zero_stage(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)) is None
    assert zero_stage(torch.zeros(2)) is None


def test_shipped_json_configs(tmp_path):
    from .launch import ROOT

    for stage in (1, 2, 3):
        assert zero_stage(ROOT / "integrations" / "deepspeed" / f"zero{stage}.json") == stage
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert zero_stage(str(path)) == 2
    assert zero_stage(str(tmp_path / "missing.json")) is None


def test_zero3_parameters_are_recognised_on_models_and_tensors():
    model = torch.nn.Linear(3, 2)
    assert not is_zero3_partitioned(model.weight)
    model.weight.ds_id, model.weight.ds_tensor = 7, torch.zeros(3)  # what ZeRO-3 attaches to a partitioned param
    assert is_zero3_partitioned(model.weight)
    assert zero_stage(model.weight) == 3 and zero_stage(model) == 3
    model.bias._hp_mapping = None  # ZeRO-1/2 leave the stage in the optimizer, not in the parameter
    assert zero_stage(model.bias) is None


def _bare(cls, **attrs):
    """An instance of a DeepSpeed class without running its constructor (which needs a process group)."""
    obj = object.__new__(cls)
    for k, v in attrs.items():
        object.__setattr__(obj, k, v)
    return obj


def test_deepspeed_classes_by_isinstance_through_wrappers():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    inner = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())

    class Wrapper:  # accelerate's DeepSpeedOptimizerWrapper exposes the engine's optimizer as .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert zero_stage(Wrapper(_bare(DeepSpeedZeroOptimizer, partition_gradients=False, optimizer=inner))) == 1
    assert zero_stage(Wrapper(_bare(DeepSpeedZeroOptimizer, partition_gradients=True, optimizer=inner))) == 2
    assert zero_stage(_bare(BF16_Optimizer, optimizer=inner)) == 1
    assert zero_stage(Wrapper(_bare(DeepSpeedZeroOptimizer_Stage3, optimizer=inner))) == 3
    assert zero_stage(Wrapper(inner)) is None

    class DeepSpeedZeroOptimizerLookalike:  # the class name alone is not enough any more
        optimizer = inner

    assert zero_stage(DeepSpeedZeroOptimizerLookalike()) is None


def test_deepspeed_without_zero_is_still_deepspeed():
    """zero_stage is None for DeepSpeed's stage-0 fp16/bf16 optimizer; uses_deepspeed still sees it."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    from ssah_plugin.hosts.zero import uses_deepspeed

    inner = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    fp16 = _bare(FP16_Optimizer, optimizer=inner)
    assert zero_stage(fp16) is None and uses_deepspeed(fp16)
    assert uses_deepspeed(torch.nn.Linear(2, 2), fp16)
    assert not uses_deepspeed(inner, torch.nn.Linear(2, 2), None)


def test_engine_reports_its_configured_stage():
    pytest.importorskip("deepspeed")
    from deepspeed import DeepSpeedEngine

    class Config:
        zero_optimization_stage = 2

    assert zero_stage(_bare(DeepSpeedEngine, _config=Config())) == 2


@pytest.mark.parametrize("version", ["0.18.9", "0.20.0", "1.0.0", "garbage"])
def test_untested_deepspeed_versions_refused_with_range_and_fix(version):
    with pytest.raises(UnsupportedSetupError) as err:
        check_deepspeed_version(version)
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_DEEPSPEED
    assert version in str(err.value)
    assert f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}" in str(err.value) and "Fix" in str(err.value)


@pytest.mark.parametrize("version", ["0.19.0", "0.19.8", "0.19.12+cpu"])
def test_supported_deepspeed_versions_pass(version):
    assert check_deepspeed_version(version) == version


def test_setup_cfg_pins_the_same_range():
    from .launch import ROOT

    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_DEEPSPEED
    pins = [line.strip() for line in (ROOT / "setup.cfg").read_text().splitlines()
            if line.strip().startswith("deepspeed")]
    assert pins and all(p.endswith(f"deepspeed>={lo_major}.{lo_minor},<{hi_major}.{hi_minor}") for p in pins), pins


def test_framework_classes_are_looked_up_only_once_loaded():
    """One helper (hosts.loaded) serves the ZeRO-stage query, the FSDP refusal and the BEMA lookup."""
    import sys

    from ssah_plugin.hosts import callback, enforce, zero
    from ssah_plugin.hosts.loaded import loaded_class

    assert zero.loaded_class is enforce.loaded_class is callback.loaded_class is loaded_class
    assert loaded_class("json", "JSONDecoder") is json.JSONDecoder
    assert loaded_class("json", "dumps") is None  # not a class
    assert loaded_class("ssah_never_imported_module", "Thing") is None
    assert "ssah_never_imported_module" not in sys.modules
