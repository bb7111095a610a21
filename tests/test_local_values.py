"""Core code never asks a framework whether a parameter's values are here: it looks at the tensor itself.

:func:`ssah_plugin.core.peft_layout.holds_values` is the framework-free test (storage as large as the logical
shape); a sharded placeholder (DeepSpeed ZeRO-3 outside a gather: empty storage, logical shape in ``ds_shape``) is
left to its host, a gathered or persisted one is read like any tensor. The 2-rank ZeRO-3 + LoRA jobs are
``tests/distributed/test_zero.py`` (``sft-z3-fp32-lora``).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from ssah_plugin.core.peft_layout import adapter_slices, holds_values


def _placeholder(shape: tuple[int, ...]) -> torch.nn.Parameter:
    """What a ZeRO-3 partitioned parameter looks like outside a gather: empty storage, the logical shape aside."""
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_shape = torch.Size(shape)
    return p


def test_holds_values_tells_sharded_placeholders_from_whole_tensors():
    assert holds_values(torch.zeros(3, 4))
    assert not holds_values(torch.zeros(0))
    assert not holds_values(_placeholder((3, 4)))
    whole = torch.nn.Parameter(torch.zeros(3, 4))
    whole.ds_shape = torch.Size((3, 4))  # a gathered (or persisted) ZeRO-3 parameter: its values are here
    assert holds_values(whole)


class _Lora(torch.nn.Module):
    """The attributes of a plain PEFT LoRA layer that adapter_slices reads."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base_layer = torch.nn.Linear(6, 4, bias=False)
        self.in_features, self.out_features = 6, 4
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(6, 2, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 4, bias=False)})
        self.lora_A["default"].weight = a
        self.lora_B["default"].weight = b
        self.merged_adapters: list = []


def test_adapter_check_reads_local_values_and_skips_placeholders():
    """A non-zero B @ A on frozen rows warns when the values are here; sharded factors are left to the host."""
    a = torch.nn.Parameter(torch.ones(2, 6))
    b = torch.nn.Parameter(torch.ones(4, 2))
    with pytest.warns(RuntimeWarning, match="already changes frozen units"):
        adapter_slices(_Lora(a, b), "layer.weight", "out", torch.tensor([1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slices = adapter_slices(_Lora(_placeholder((2, 6)), _placeholder((4, 2))), "layer.weight", "out",
                                torch.tensor([1]))
    assert [s.fill for s in slices] == [0.0] and slices[0].numel == 2  # row 1 of lora_B [4, 2], kept at zero
