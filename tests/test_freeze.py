"""FreezeEngine and plan_frozen_slices: what is snapshotted, when gradients are masked, restore, hooks, detach."""
from __future__ import annotations

import pytest
import torch

from ssah_plugin import FreezeEngine, Mask, plan_frozen_slices
from ssah_plugin.core.plan import FrozenSlice
from ssah_plugin.hosts.enforce import build_enforcer, detect_host
from ssah_plugin.io.tiny import tiny_model


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("qwen2", seed=0)  # has value biases
    mask = Mask.from_units(model, {"model.layers.0.mlp": [4, 1, 4], "model.layers.0.self_attn": [0, 16, 17],
                                   "model.layers.1.mlp": [2]})
    return model, mask


def test_plan_merges_units_per_tensor(setup):
    model, mask = setup
    plan = {(s.name, s.axis): s for s in plan_frozen_slices(mask, model)}
    assert set(plan) == {
        ("model.layers.0.mlp.gate_proj.weight", 0), ("model.layers.0.mlp.up_proj.weight", 0),
        ("model.layers.0.mlp.down_proj.weight", 1), ("model.layers.0.self_attn.v_proj.weight", 0),
        ("model.layers.0.self_attn.v_proj.bias", 0), ("model.layers.0.self_attn.o_proj.weight", 1),
        ("model.layers.1.mlp.gate_proj.weight", 0), ("model.layers.1.mlp.up_proj.weight", 0),
        ("model.layers.1.mlp.down_proj.weight", 1)}
    assert plan[("model.layers.0.mlp.gate_proj.weight", 0)].index.tolist() == [1, 4]  # sorted, unique
    # channels 0 and 16 (heads 0 and 1) share KV head 0 -> value row 0; channel 17 -> value row 1
    assert plan[("model.layers.0.self_attn.v_proj.weight", 0)].index.tolist() == [0, 1]
    assert plan[("model.layers.0.self_attn.o_proj.weight", 1)].index.tolist() == [0, 16, 17]
    assert plan[("model.layers.0.self_attn.v_proj.bias", 0)].numel == 2
    assert plan[("model.layers.0.mlp.down_proj.weight", 1)].numel == 2 * 64
    assert plan_frozen_slices(mask, model, "none") == []


@pytest.mark.parametrize("mode", ["tensor", "post_accumulate"])
def test_gradients_masked_during_backward(setup, mode):
    model, mask = setup
    eng = FreezeEngine(plan_frozen_slices(mask, model), grad_mode=mode).attach()
    seen = {}
    w = model.model.layers[0].mlp.down_proj.weight
    # runs after every hook registered earlier: by then the frozen columns must already be zero

    def probe(p: torch.Tensor) -> None:
        seen["g"] = p.grad.clone()

    handle = w.register_post_accumulate_grad_hook(probe)
    try:
        ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        assert torch.equal(seen["g"][:, [1, 4]], torch.zeros(64, 2))
        assert seen["g"][:, [0, 2, 3]].abs().sum() > 0
        assert torch.equal(model.model.layers[0].self_attn.v_proj.bias.grad[[0, 1]], torch.zeros(2))
    finally:
        handle.remove()
        eng.detach()
        model.zero_grad(set_to_none=True)


def test_snapshot_is_only_the_frozen_slices_and_restore_is_bitwise(setup):
    model, mask = setup
    slices = plan_frozen_slices(mask, model)
    eng = FreezeEngine(slices, grad_mode="none").attach()
    assert eng.frozen_elements == sum(s.numel for s in slices) == 2 * 64 * 3 + 2 * 64 + 2 + 3 * 64 + 64 * 3
    assert eng.snapshot_bytes == eng.frozen_elements * 4
    w = model.model.layers[0].mlp.up_proj.weight
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    assert eng.max_drift() == pytest.approx(1.0, abs=1e-6)
    eng.after_step()
    assert eng.max_drift() == 0.0
    assert torch.equal(w[[1, 4]], before[[1, 4]]) and not torch.equal(w[0], before[0])
    with torch.no_grad():
        w.copy_(before)
    eng.detach()


def test_fill_slices_and_requires_grad_filter():
    p = torch.nn.Parameter(torch.ones(4, 3))
    q = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    eng = FreezeEngine([FrozenSlice("p", p, 1, torch.tensor([2]), fill=0.0), FrozenSlice("q", q, 0, torch.tensor([0]))])
    assert [s.name for s in eng.slices] == ["p"]  # parameters that do not train need nothing
    eng.attach()
    assert torch.equal(p[:, 2], torch.zeros(4)) and torch.equal(p[:, :2], torch.ones(4, 2))  # fill holds from start
    (p * 3).sum().backward()
    assert torch.equal(p.grad[:, 2], torch.zeros(4)) and torch.equal(p.grad[:, 0], torch.full((4,), 3.0))
    eng.detach()
    assert not eng.attached
    eng.attach()  # re-attach after detach registers hooks again
    p.grad = None
    (p * 3).sum().backward()
    assert torch.equal(p.grad[:, 2], torch.zeros(4))
    eng.detach()
    with pytest.raises(ValueError, match="grad_mode"):
        FreezeEngine([], grad_mode="later")  # type: ignore[arg-type]


def test_cpu_thread_count_is_restored(setup):
    model, mask = setup
    torch.set_num_threads(2)
    try:
        eng = FreezeEngine(plan_frozen_slices(mask, model), grad_mode="post_accumulate").attach()
        ids = torch.randint(3, 500, (1, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        eng.after_step()
        assert torch.get_num_threads() == 2
        eng.detach()
        model.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(1)


def test_build_enforcer_auto_mode_and_host(setup, tmp_path):
    model, mask = setup
    assert detect_host(model) == "torch"
    m, eng = build_enforcer(mask.save(tmp_path / "m.safetensors"), model)
    assert isinstance(m, Mask) and eng.grad_mode == "post_accumulate"  # single process
    _, eng = build_enforcer(mask, model, grad_mode="tensor")
    assert eng.grad_mode == "tensor"


def test_snapshot_in_host_memory(setup):
    model, mask = setup
    slices = plan_frozen_slices(mask, model)
    eng = FreezeEngine(slices, grad_mode="post_accumulate", snapshot_device="cpu").attach()
    assert eng.snapshot_device == "cpu" and all(t.device.type == "cpu" for t in eng._snapshots)
    assert eng.snapshot_bytes == eng.frozen_elements * 4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {s.name: s.param.detach().index_select(s.axis, s.index).clone() for s in slices}
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        for seed in range(2):
            ids = torch.randint(3, 500, (2, 8), generator=torch.Generator().manual_seed(seed))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            eng.after_step()
            opt.zero_grad(set_to_none=True)
        assert eng.max_drift() == 0.0
        for s in slices:
            assert torch.equal(s.param.detach().index_select(s.axis, s.index), before[s.name]), s.name
    finally:
        eng.detach()
        model.load_state_dict(whole)  # the module-scoped model goes back to its values for the other tests
        model.zero_grad(set_to_none=True)
    for bad in ("pinned", "cuda", None, torch.device("cpu")):
        with pytest.raises(ValueError, match="snapshot_device must be 'param'"):
            FreezeEngine(slices, snapshot_device=bad)  # type: ignore[arg-type]


def test_fsdp_and_dtensor_parameters_are_refused(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    from torch.distributed.fsdp import fully_shard

    from ssah_plugin.errors import UnsupportedSetupError

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        assert detect_host(model) == "torch"
        fully_shard(model)
        with pytest.raises(UnsupportedSetupError, match="FSDP .* not supported"):
            detect_host(model)
    finally:
        dist.destroy_process_group()
