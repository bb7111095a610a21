"""Fast single-process checks of the DeepSpeed enforcer's pieces (the real ZeRO jobs are in test_zero.py)."""
from __future__ import annotations

import random

import pytest
import torch

from ssah_plugin import Mask, SSAHOptimizer, UnsupportedSetupError
from ssah_plugin.core.plan import plan_frozen_slices
from ssah_plugin.hosts.deepspeed import (
    DeepSpeedEnforcer,
    _find_zero_optimizer,
    deepspeed_enforce,
)
from ssah_plugin.hosts.zero_fragments import FragmentPiece, plan_blocks
from ssah_plugin.io.tiny import tiny_model


def _brute_force(shape, axis, index, start, numel) -> torch.Tensor:
    """Flat positions (relative to ``start``) of the frozen values inside ``[start, start + numel)``, one by one."""
    sel = torch.zeros(shape, dtype=torch.bool)
    sel.index_fill_(axis, index, True)
    flat = sel.reshape(-1).nonzero().reshape(-1)
    return flat[(flat >= start) & (flat < start + numel)] - start


def _covered(blocks, numel) -> torch.Tensor:
    marks = torch.zeros(numel)
    for b in blocks:
        b.view(marks).index_fill_(1, b.index, 1.0)
    return marks.nonzero().reshape(-1)


@pytest.mark.parametrize("shape,axis", [((6, 5), 0), ((6, 5), 1), ((7,), 0), ((3, 4, 5), 1), ((3, 4, 5), 2)])
def test_blocks_cover_exactly_the_frozen_positions_of_every_range(shape, axis):
    """Every fragment [start, start+numel) of the flattening, padding past the end included (ZeRO-3)."""
    total = torch.Size(shape).numel()
    rng = random.Random(0)
    for k in (0, 1, 2, shape[axis]):
        index = torch.tensor(sorted(rng.sample(range(shape[axis]), k)), dtype=torch.int64)
        for start in range(total + 1):
            for numel in {1, 2, 7, total - start, total - start + 3} - {0} if total > start else {1, 3}:
                blocks = plan_blocks(shape, axis, index, start, numel)
                assert len(blocks) <= 7
                assert sum(b.numel for b in blocks) == _brute_force(shape, axis, index, start, numel).numel()
                assert torch.equal(_covered(blocks, numel), _brute_force(shape, axis, index, start, numel))


def test_whole_row_fragments_are_one_block_with_small_indices():
    """A fragment holding whole rows is one index_copy_, with one int64 per frozen row (not per frozen element)."""
    index = torch.tensor([1, 4, 9])
    rows = plan_blocks((12, 64), 0, index, 0, 12 * 64)
    cols = plan_blocks((64, 12), 1, index, 0, 12 * 64)
    assert len(rows) == len(cols) == 1 and rows[0].index.numel() == cols[0].index.numel() == 3
    half = plan_blocks((12, 64), 0, index, 5 * 64 + 10, 3 * 64)  # a ZeRO-3-like cut through rows
    assert sum(b.index.numel() for b in half) <= 3


def test_piece_restores_bitwise_and_shares_values_with_another_copy():
    master = torch.randn(40, dtype=torch.float32)
    copy_ = master.to(torch.bfloat16).to(torch.float32)  # a master made from a bf16 copy, as DeepSpeed does
    model_copy = copy_.to(torch.bfloat16)
    blocks = plan_blocks((8, 10), 1, torch.tensor([0, 3]), 20, 40)
    piece = FragmentPiece.record(lambda: copy_, blocks, None)
    twin = piece.sharing(lambda: model_copy)
    before_master, before_model = copy_.clone(), model_copy.clone()
    copy_.add_(0.25)
    model_copy.add_(0.25)
    assert piece.drift() > 0 and twin.drift() > 0
    piece.restore()
    twin.restore()
    sel = _brute_force((8, 10), 1, torch.tensor([0, 3]), 20, 40)
    assert torch.equal(copy_[sel], before_master[sel]) and torch.equal(model_copy[sel], before_model[sel])
    assert piece.drift() == 0.0 and twin.drift() == 0.0
    fill = FragmentPiece.record(lambda: copy_, blocks, 0.0)
    assert fill.values is None and fill.nbytes == sum(b.index.numel() * 8 for b in blocks)
    fill.restore()
    assert torch.equal(copy_[sel], torch.zeros(sel.numel()))


def _stage0(seed: int = 0):
    """A stage-0 enforcer (the model parameters are the master) on a tiny model with AdamW and weight decay."""
    model = tiny_model("llama", seed=seed)
    mask = Mask.from_units(model, {"model.layers.0.mlp": [1, 2, 9], "model.layers.1.self_attn": [0, 3]})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    slices = plan_frozen_slices(mask, model, None)
    return model, opt, slices, DeepSpeedEnforcer(slices, model, None, opt, stage=0)


def _train(model, opt, steps: int = 3) -> None:
    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_restore_is_a_step_post_hook_and_removal_is_its_handle():
    """The restore runs as torch's step post-hook; detach() removes it (the step is not replaced on the instance)."""
    model, opt, slices, enf = _stage0()
    ref = [s.param.detach().index_select(s.axis, s.index).clone() for s in slices]
    enf.attach()
    assert "step" not in vars(opt)  # no per-instance patch of step
    _train(model, opt)
    assert enf.restores == 3 and enf.max_drift() == 0.0
    assert all(torch.equal(s.param.index_select(s.axis, s.index), r) for s, r in zip(slices, ref))
    enf.detach()
    assert "step" not in vars(opt)
    _train(model, opt, 2)  # weight decay moves the frozen values again: the check can fail
    assert enf.restores == 3 and enf.max_drift() > 0.0


def test_restore_runs_when_deepspeed_calls_step_through_its_own_wrapper():
    """DeepSpeed's ZeRO optimizers are not torch optimizers; they call ``self.optimizer.step()`` on the wrapped one
    with its param groups narrowed to the group being stepped. The post-hook sees exactly that call."""

    class ZeroLike:  # the calling pattern of DeepSpeedZeroOptimizer._optimizer_step
        def __init__(self, optimizer):
            self.optimizer = optimizer

        def step(self):
            groups = self.optimizer.param_groups
            for g in groups:
                self.optimizer.param_groups = [g]
                self.optimizer.step()
            self.optimizer.param_groups = groups

    model, opt, _, enf = _stage0(seed=1)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})  # a group without frozen slices
    wrapper = ZeroLike(opt)
    enf.attach()
    ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        wrapper.step()
        opt.zero_grad()
    assert enf.restores == 4 and enf.max_drift() == 0.0
    enf.detach()


def test_second_enforcer_on_the_same_optimizer_is_refused_until_the_first_detaches():
    model, opt, slices, enf = _stage0()
    enf.attach()
    other = DeepSpeedEnforcer(slices, model, None, opt, stage=0)
    with pytest.raises(UnsupportedSetupError, match="already attached"):
        other.attach()
    enf.detach()
    other.attach()
    other.detach()


def test_deepspeed_enforce_needs_an_engine():
    with pytest.raises(UnsupportedSetupError, match="deepspeed.initialize"):
        deepspeed_enforce(object(), "unused.safetensors")


def test_unknown_deepspeed_optimizer_is_refused_with_fix():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    fp16 = object.__new__(FP16_Optimizer)  # a DeepSpeed optimizer without fragment mapping (no process group needed)
    fp16.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(UnsupportedSetupError, match="stage to 1, 2 or 3"):
        _find_zero_optimizer(fp16)


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

