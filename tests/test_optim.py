"""SSAHOptimizer for custom loops: same guarantee as the callback (schedulers, clipping, GradScaler skips, accelerate)."""
from __future__ import annotations

import copy

import pytest
import torch

from ssah_plugin import Mask, SSAHOptimizer
from ssah_plugin.errors import MaskMismatchError, UnsupportedSetupError
from ssah_plugin.io.tiny import tiny_model
from ssah_plugin.testing.data import random_batches as _batches
from ssah_plugin.testing.oracles import dense_frozen_masks as _dense

UNITS = {"model.layers.0.mlp": [0, 3, 127], "model.layers.0.self_attn": [1, 17, 33],
         "model.layers.1.mlp": [64], "model.layers.1.self_attn": [0, 63]}



def _loop(model, opt, sched, batches, *, scaler=None, inf_at=None, hand=None):
    """Forward/backward/clip/step/zero_grad; ``hand=(dense, base)`` does the masking and restore by hand."""
    norms = []
    for i, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        (scaler.scale(loss) if scaler else loss).backward()
        if hand:
            for n, p in model.named_parameters():
                if n in hand[0]:
                    p.grad.masked_fill_(hand[0][n], 0)
        if i == inf_at:
            model.model.layers[1].mlp.down_proj.weight.grad[0, 0] = float("inf")  # an unfrozen element
        if scaler:
            scaler.unscale_(opt)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if hand:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in hand[0]:
                        p.copy_(torch.where(hand[0][n], hand[1][n], p))
        sched.step()
        opt.zero_grad(set_to_none=True)
    return norms


@pytest.mark.parametrize("snapshot_device", ["param", "cpu"])
@pytest.mark.parametrize("use_scaler", [False, True], ids=["plain", "gradscaler"])
def test_custom_loop_matches_hand_reference(use_scaler, snapshot_device):
    model = tiny_model("mistral", seed=0)
    ref = copy.deepcopy(model)
    mask = Mask.from_units(model, UNITS)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense = _dense(mask, model)
    batches = _batches(6)
    inf_at = 2 if use_scaler else None

    def make(m, wrap):
        inner = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        opt = SSAHOptimizer(inner, m, mask, snapshot_device=snapshot_device) if wrap else inner
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if use_scaler else None
        return opt, sched, scaler

    opt, sched, scaler = make(model, True)
    norms = _loop(model, opt, sched, batches, scaler=scaler, inf_at=inf_at)
    r_opt, r_sched, r_scaler = make(ref, False)
    r_norms = _loop(ref, r_opt, r_sched, batches, scaler=r_scaler, inf_at=inf_at, hand=(dense, base))
    assert opt.max_drift() == 0.0 and opt.enforcer.snapshot_device == snapshot_device
    assert all(torch.isinf(a) == torch.isinf(b) and (torch.isinf(a) or torch.equal(a, b)) for a, b in zip(norms, r_norms))
    assert all(float(n) > 0.05 for n in norms)  # clipping triggered
    if use_scaler:
        assert torch.isinf(norms[2]) and scaler.get_scale() < 2.0 ** 8  # the step was really skipped
    assert sched.get_last_lr() == r_sched.get_last_lr() and opt.param_groups[0]["lr"] == 1e-2
    params = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        assert torch.equal(p, params[n]), n
    for n, m in dense.items():
        assert torch.equal(params[n].detach()[m], base[n][m])
        assert not torch.equal(params[n].detach()[~m], base[n][~m])


def test_accelerate_prepare_with_accumulation():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    model = tiny_model("phi3", seed=0)
    mask = Mask.from_units(model, {"model.layers.0.mlp": [3, 4], "model.layers.1.self_attn": [5, 50]})
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense = _dense(mask, model)
    try:
        acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        opt = SSAHOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, mask)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        pmodel, popt, psched = acc.prepare(model, opt, sched)
        for ids in _batches(8):
            with acc.accumulate(pmodel):
                acc.backward(pmodel(input_ids=ids, labels=ids).loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(pmodel.parameters(), 0.05)
                popt.step()
                psched.step()
                popt.zero_grad()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert opt.max_drift() == 0.0
    for n, p in model.named_parameters():
        if n in dense:
            assert torch.equal(p.detach()[dense[n]], base[n][dense[n]]), n
            assert not torch.equal(p.detach()[~dense[n]], base[n][~dense[n]]), n


def test_bf16_model_without_master_weights():
    model = tiny_model("gemma2", seed=0, dtype=torch.bfloat16)
    mask = Mask.from_units(model, {"model.layers.0.mlp": [1, 2], "model.layers.1.self_attn": [7]})
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SSAHOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1), model, mask)
    for ids in _batches(4):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.max_drift() == 0.0
    dense = _dense(mask, model)
    for n, p in model.named_parameters():
        if n in dense:
            assert torch.equal(p.detach()[dense[n]], base[n][dense[n]]), n


def test_wrapper_api_and_errors(tmp_path):
    model = tiny_model("gpt2", seed=0)
    mask = Mask.from_units(model, {"transformer.h.0.mlp": [5]})
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        SSAHOptimizer("adam", model, mask)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"snapshot_device must be 'param' .* got 'cuda'"):
        SSAHOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mask, snapshot_device="cuda")  # type: ignore[arg-type]
    with pytest.raises(MaskMismatchError, match="other weights"):
        SSAHOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), tiny_model("gpt2", seed=4), mask)
    other = tiny_model("gpt2", seed=0)
    with pytest.raises(UnsupportedSetupError, match="none of the frozen parameters is in this optimizer"):
        SSAHOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), model, mask)
    head = [p for n, p in model.named_parameters() if not n.startswith("transformer.h.0")]
    opt = SSAHOptimizer(torch.optim.AdamW([p for n, p in model.named_parameters() if n.startswith("transformer.h.0")],
                                          lr=1e-2, weight_decay=0.1), model, mask.save(tmp_path / "m.safetensors"))
    opt.add_param_group({"params": head, "lr": 1e-3})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.optimizer.param_groups
    ids = _batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert opt.state is opt.optimizer.state and len(opt.state) > 0
    assert "SSAHOptimizer(" in repr(opt) and opt.max_drift() == 0.0
    opt.remove_hooks()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.transformer.h[0].mlp.c_proj.weight.grad[5].abs().sum() > 0  # hooks gone: gradient flows again
