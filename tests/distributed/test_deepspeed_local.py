"""Fast single-process checks of the DeepSpeed enforcer's pieces (the real ZeRO jobs are in test_zero.py)."""
from __future__ import annotations

import pytest
import torch

from ssah_plugin import Mask, SSAHOptimizer, UnsupportedSetupError
from ssah_plugin.core.plan import FrozenSlice
from ssah_plugin.hosts.deepspeed import (
    _find_zero_optimizer,
    _flat_positions,
    _local,
    deepspeed_enforce,
)
from ssah_plugin.io.tiny import tiny_model


@pytest.mark.parametrize("axis", [0, 1])
def test_flat_positions_select_exactly_the_slice(axis):
    w = torch.arange(6 * 5, dtype=torch.float32).reshape(6, 5)
    idx = torch.tensor([1, 4])
    s = FrozenSlice("w", torch.nn.Parameter(w.clone()), axis, idx)
    pos = _flat_positions(s, tuple(w.shape))
    assert torch.equal(w.reshape(-1)[pos].sort().values, w.index_select(axis, idx).reshape(-1).sort().values)
    # a rank owning flat [7, 19) sees only its part, re-based to its fragment
    local = _local(pos, 7, 12)
    assert torch.equal(local + 7, pos[(pos >= 7) & (pos < 19)])


def test_deepspeed_enforce_needs_an_engine():
    with pytest.raises(UnsupportedSetupError, match="deepspeed.initialize"):
        deepspeed_enforce(object(), "unused.safetensors")


def test_unknown_deepspeed_optimizer_is_refused_with_fix():
    class FP16_Optimizer:  # stands in for a DeepSpeed optimizer without fragment mapping
        __module__ = "deepspeed.runtime.fp16.fused_optimizer"

        def __init__(self):
            self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    with pytest.raises(UnsupportedSetupError, match="stage to 1, 2 or 3"):
        _find_zero_optimizer(FP16_Optimizer())


def test_ssah_optimizer_refuses_zero_at_first_backward():
    """A parameter taken over by ZeRO (it gains ``_hp_mapping`` / ``ds_id``) makes SSAHOptimizer refuse before any
    update; without DeepSpeed the same guard is silent."""
    model = tiny_model("llama")
    mask = Mask.from_units(model, {"model.layers.0.mlp": [1, 2]})
    opt = SSAHOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, mask)
    ids = torch.randint(3, 500, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()  # plain PyTorch: fine
    opt.step()
    opt.zero_grad()

    model2 = tiny_model("llama")
    opt2 = SSAHOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2), model2, mask)
    for p in model2.parameters():
        p._hp_mapping = None  # what ZeRO-1/2 leaves on every parameter
    before = {n: p.detach().clone() for n, p in model2.named_parameters()}
    with pytest.raises(UnsupportedSetupError, match="SSAHCallback"):
        model2(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.equal(before[n], p) for n, p in model2.named_parameters())
    del opt2
