"""locate statistics: float32 batch moments merged in float64, no float64 activation copies, no host sync per hook."""
from __future__ import annotations

import pytest
import torch

from ssah_plugin.core.units import describe_units
from ssah_plugin.io.tiny import tiny_model
from ssah_plugin.locate.stats import ChannelStats, StatsCollector, counted_batches

SPLITS = [1, 13, 400, 0, 586]


def _offset_data(dtype=torch.float64) -> torch.Tensor:
    torch.manual_seed(0)
    return (1e4 + torch.randn(1000, 7, dtype=torch.float64) * torch.arange(1, 8)).to(dtype)


def test_merge_is_exact_in_float64_with_large_offset():
    x = _offset_data()
    st = ChannelStats(7)
    for chunk in torch.split(x, SPLITS):
        st.update(chunk)  # float64 input stays float64
    assert st.n == 1000
    torch.testing.assert_close(st.variance(), x.var(0, unbiased=False), rtol=1e-10, atol=0)
    assert st.mean.numel() == 7 and st.m2.numel() == 7  # state does not grow with tokens


@pytest.mark.parametrize("splits", [SPLITS, [7] * 142 + [6]], ids=["uneven", "small"])
def test_float32_batches_lose_no_precision_to_a_large_offset(torch_device, splits):
    """The batch moments are taken around a shift (the running mean): float32 batches with a 1e4 offset keep the
    variance to ~4e-8 relative. Plain float32 batch means would lose ~8e-6 here (their rounding at 1e4 enters
    the merge), so 1e-6 separates the two."""
    x32 = _offset_data(torch.float32)
    st = ChannelStats(7, torch_device)
    for chunk in torch.split(x32.to(torch_device), splits):
        st.update(chunk)
    ref = x32.double().var(0, unbiased=False)
    torch.testing.assert_close(st.variance(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(st.mean.cpu(), x32.double().mean(0), rtol=1e-10, atol=0)


def test_low_precision_activations_are_promoted_to_float32_only(monkeypatch):
    """bf16 / fp16 / fp32 activations: the one pass over the batch runs in float32; nothing of the activations'
    size is made in float64 (only the [dim] moments are)."""
    seen = []
    real = torch.var_mean

    def spy(t, *args, **kwargs):
        seen.append((t.dtype, tuple(t.shape)))
        return real(t, *args, **kwargs)

    monkeypatch.setattr(torch, "var_mean", spy)
    torch.manual_seed(0)
    data = 3 + torch.randn(3, 9, 5)
    st = ChannelStats(5)
    for dt, x in zip((torch.bfloat16, torch.float16, torch.float32), data):
        st.update(x.to(dt))
    monkeypatch.undo()
    assert seen == [(torch.float32, (9, 5))] * 3
    exact = torch.cat([x.to(dt).double() for dt, x in zip((torch.bfloat16, torch.float16, torch.float32), data)])
    torch.testing.assert_close(st.variance(), exact.var(0, unbiased=False), rtol=1e-6, atol=0)


def _collector():
    model = tiny_model("llama").eval()
    groups = describe_units(model)
    g = groups[0]
    return StatsCollector(model, groups), g.score_module, model.get_submodule(g.score_module).in_features


def test_hook_makes_no_host_round_trip(monkeypatch):
    """Every way Python code can pull a tensor's value to the host raises during the hook calls: the hook works
    from shapes and device tensors only (on a GPU: no synchronisation per hook call)."""
    col, name, dim = _collector()
    torch.manual_seed(0)
    xs = [torch.randn(2, 5, dim), torch.randn(2, 3, dim)]
    index = [torch.tensor([0, 1, 2, 6, 9]), torch.tensor([1, 4])]

    def boom(*args, **kwargs):
        raise AssertionError("host round trip in the statistics hook")

    hook = col._hook(name)
    with monkeypatch.context() as m:
        for meth in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            m.setattr(torch.Tensor, meth, boom)
        for x, idx in zip(xs, index):
            col.select = idx
            hook(None, (x,))
    want = torch.cat([x.reshape(-1, dim)[i] for x, i in zip(xs, index)]).double()
    assert col.stats[name].n == 7
    torch.testing.assert_close(col.variance(name), want.var(0, unbiased=False), rtol=1e-6, atol=1e-12)


def test_boolean_select_counts_the_same_positions_as_indices():
    col_i, name, dim = _collector()
    col_b, _, _ = _collector()
    torch.manual_seed(1)
    x = torch.randn(2, 4, dim)
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    col_i.select = mask.reshape(-1).nonzero().squeeze(1)
    col_b.select = mask.reshape(-1)
    col_i._hook(name)(None, (x,))
    col_b._hook(name)(None, (x,))
    assert col_i.stats[name].n == col_b.stats[name].n == 4
    assert torch.equal(col_i.variance(name), col_b.variance(name))


def test_counted_batches_index_the_counted_positions():
    from ssah_plugin.data.rows import EncodedPair

    enc = [EncodedPair([5, 6, 7], [False, True, True]), EncodedPair([8, 9, 10, 11], [True, False, False, True])]
    ((ids, att, index),) = list(counted_batches(enc, 2, pad_id=0))
    assert ids.tolist() == [[8, 9, 10, 11], [5, 6, 7, 0]]  # longest first, right padding
    assert att.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert index.tolist() == [0, 3, 5, 6]  # flat positions of [batch * seq]


@pytest.mark.cuda
def test_hook_does_not_synchronise_on_cuda():
    """The real check of the host round-trip test: CUDA's sync debug mode raises on any synchronising call."""
    col, name, dim = _collector()
    x = torch.randn(4, 16, dim, device="cuda")
    index = torch.arange(0, 64, 3, device="cuda")
    hook = col._hook(name)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # first batch (shift = first row) and later ones (shift = running mean)
            col.select = index
            hook(None, (x,))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = x.reshape(-1, dim)[index].double().cpu()
    assert col.stats[name].n == 3 * index.numel()
    torch.testing.assert_close(col.variance(name), want.var(0, unbiased=False), rtol=1e-5, atol=1e-10)
