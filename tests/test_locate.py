"""locate: calibration statistics and scores equal a direct computation; CLI end to end on tiny:llama.

Tolerances: the statistics take each batch's moments in float32 (merged in float64; tests/test_locate_stats.py),
so they match a float64 computation on the same float32 activations to ~1e-7 relative; rtol 1e-6 (float32
reductions on a GPU round differently, within that bound).
"""
from __future__ import annotations

import json

import pytest
import torch

from ssah_plugin.core.mask import Mask
from ssah_plugin.core.units import describe_units
from ssah_plugin.data.rows import encode_pairs, load_pairs
from ssah_plugin.io.models import pad_id_of
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer
from ssah_plugin.locate import LocateConfig, channel_scores, collect_stats, locate, unit_scores

SAFETY = "shipped:safety_refusals.jsonl"
UTILITY = "shipped:benign_instructions.jsonl"
RTOL = 1e-6  # float32 per-batch moments (module docstring)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama").eval()


def _direct_stats(model, groups, encoded):
    """All activations of every score module, one sequence at a time (no padding), then torch.var in float64."""
    acts = {g.score_module: [] for g in groups}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda m, a, name=name: acts[name].append(a[0][0].detach().double())) for name in acts]
    sel = []
    with torch.no_grad():
        for e in encoded:
            model(input_ids=torch.tensor([e.input_ids]))
            sel.append(torch.tensor(e.count))
    for h in hooks:
        h.remove()
    mask = torch.cat(sel)
    return {name: torch.cat(xs)[mask].var(0, unbiased=False) for name, xs in acts.items()}


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_statistics_equal_direct_computation(llama, tok, tokens):
    pairs = load_pairs(SAFETY, max_samples=6, seed=1)
    enc = encode_pairs(tok, pairs, tokens=tokens, max_length=96)
    groups = describe_units(llama)
    col = collect_stats(llama, groups, enc, batch_size=4, pad_id=pad_id_of(tok), progress=False)
    direct = _direct_stats(llama, groups, enc)
    for name, var in direct.items():
        torch.testing.assert_close(col.variance(name), var, rtol=RTOL, atol=1e-12)
        assert col.stats[name].n == sum(sum(e.count) for e in enc)  # padding never counted


def test_response_positions_are_the_ones_predicting_response_tokens(tok):
    from ssah_plugin.data.chat import chat_pair_ids

    pair = ("How do I bake bread?", "Mix flour and water.")
    p_ids, r_ids = chat_pair_ids(tok, *pair)
    (e,) = encode_pairs(tok, [pair], tokens="response")
    assert e.input_ids == p_ids + r_ids
    counted = [i for i, c in enumerate(e.count) if c]
    assert counted == list(range(len(p_ids) - 1, len(p_ids) + len(r_ids) - 1))
    (a,) = encode_pairs(tok, [pair], tokens="all")
    assert all(a.count)


def test_batching_does_not_change_statistics(llama, tok):
    enc = encode_pairs(tok, load_pairs(UTILITY, max_samples=5), max_length=64)
    groups = describe_units(llama)
    one = collect_stats(llama, groups, enc, batch_size=1, pad_id=0, progress=False)
    many = collect_stats(llama, groups, enc, batch_size=5, pad_id=0, progress=False)
    for name in one.modules:
        torch.testing.assert_close(one.variance(name), many.variance(name), rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scores_are_variance_times_column_norm(tok, family):
    model = tiny_model(family).eval()
    cfg = LocateConfig(max_samples=4, max_length=64, progress=False)
    mask = locate(model, tok, safety=SAFETY, utility=UTILITY, config=cfg)
    groups = describe_units(model)
    enc = encode_pairs(tok, load_pairs(SAFETY, max_samples=4), max_length=64)
    direct = _direct_stats(model, groups, enc)
    for gi, g in enumerate(groups):
        w = model.get_submodule(g.score_module).weight.detach().double()
        norm2 = (w ** 2).sum(0) if family != "gpt2" else (w ** 2).sum(1)  # Conv1D: [in, out], row j
        torch.testing.assert_close(mask.scores["safety"][gi], direct[g.score_module] * norm2, rtol=RTOL, atol=1e-15)
        z = mask.scores["safety_z"][gi]
        assert abs(float(z.mean())) < 1e-9 and abs(float(z.std(unbiased=False)) - 1) < 1e-9  # z-score per group


def test_head_score_is_sum_of_channel_scores(llama, tok):
    cfg = dict(max_samples=4, max_length=64, progress=False)
    ch = locate(llama, tok, config=LocateConfig(**cfg))
    hd = locate(llama, tok, config=LocateConfig(granularity="head", **cfg))
    for gc, gh, sc, sh in zip(ch.groups, hd.groups, ch.scores["utility"], hd.scores["utility"]):
        if gc.kind == "attn":
            assert gh.n_units == 4
            torch.testing.assert_close(sh, sc.reshape(4, -1).sum(1), rtol=1e-12, atol=0)
        else:
            assert torch.equal(sc, sh)


def test_locate_result_fields(llama, tok):
    mask = locate(llama, tok, config=LocateConfig(max_samples=4, max_length=64, progress=False))
    assert set(mask.scores) == {"safety", "utility", "safety_z", "utility_z"}
    assert mask.default_policy == "ru-only"
    assert mask.method["config"]["max_samples"] == 4 and mask.method["mode"] == "whole-model"
    assert mask.method["data"]["n_safety"] == 4
    n = mask.n_units
    counts = mask.summary()["classes"]
    assert counts == {"SCU": round(0.013 * n), "UCU": round(0.133 * n), "RU": round(0.148 * n),
                      "CU": n - round(0.013 * n) - round(0.133 * n) - round(0.148 * n)}
    mask.validate(llama)


def test_unit_scores_sum_over_slice_index(llama):
    g = describe_units(llama, "head")[1]
    per_channel = torch.arange(64, dtype=torch.float64)
    assert unit_scores(g, per_channel).tolist() == [sum(range(i * 16, i * 16 + 16)) for i in range(4)]
    w = torch.ones(3, 64)
    assert torch.equal(channel_scores(torch.full((64,), 2.0), w, "linear"), torch.full((64,), 6.0,
                                                                                          dtype=torch.float64))


def test_cli_locate_end_to_end(tmp_path, capsys):
    from ssah_plugin.cli import main

    out = tmp_path / "tiny.mask.safetensors"
    rc = main(["locate", "--model", "tiny:llama", "--max-samples", "4", "--max-length", "96", "--no-progress",
               "-o", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"]["SCU"] == 5 and summary["mode"] == "whole-model"
    mask = Mask.load(out)
    mask.validate(tiny_model("llama"))
    assert mask.method["config"]["max_length"] == 96


def test_cli_locate_reports_data_errors(tmp_path, capsys):
    from ssah_plugin.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc = main(["locate", "--model", "tiny:llama", "--safety", str(empty), "-o", str(tmp_path / "m.safetensors")])
    assert rc == 2
    assert "empty" in capsys.readouterr().err


def test_rows_longer_than_the_model_are_cut_by_the_one_rule(tmp_path, tok):
    """No --max-length: rows longer than the model's 256 positions are cut by data.rows.fit_pair (response kept,
    prompt keeps its end), with one warning per data set, instead of being refused."""
    from ssah_plugin.cli import main
    from ssah_plugin.data.chat import chat_pair_ids
    from ssah_plugin.data.rows import fit_pair

    pairs = load_pairs(UTILITY, max_samples=16, seed=0)
    long = [p for p in pairs if sum(map(len, chat_pair_ids(tok, *p))) > 256]
    assert long  # shipped utility rows exceed the tiny model's positions
    out = tmp_path / "m.safetensors"
    with pytest.warns(UserWarning, match=rf"utility data: {len(long)} of 16 rows are longer than max_length=256"):
        rc = main(["locate", "--model", "tiny:llama", "--max-samples", "16", "--no-progress", "-o", str(out)])
    assert rc == 0
    (e,) = encode_pairs(tok, long[:1], max_length=256)
    p_ids, r_ids, cut = fit_pair(*chat_pair_ids(tok, *long[0]), 256)
    assert cut and e.input_ids == p_ids + r_ids and len(e.input_ids) == 256
    assert sum(e.count) == len(r_ids)  # every kept response token is counted (the position before it)
    assert Mask.load(out).method["config"]["max_length"] is None


def test_auto_mode_end_to_end_restores_weights(llama, tok):
    before = {k: v.detach().clone() for k, v in llama.named_parameters()}
    cfg = LocateConfig(max_samples=3, max_length=64, progress=False, auto=True, auto_holdout=2,
                       auto_max_new_tokens=4, auto_scu_grid=(0.01, 0.02), auto_ru_grid=(0.1, 0.2),
                       auto_refusal_drop=0.0, auto_utility_tolerance=10.0)
    mask = locate(llama, tok, config=cfg)
    auto = mask.method["auto"]
    assert auto["scu"] == 0.01 and auto["ru"] == 0.2  # drop 0 is met at once; a huge tolerance keeps every RU size
    assert [r["fraction"] for r in auto["ru_sweep"]] == [0.1, 0.2]
    assert mask.method["config"]["scu"] == 0.01 and mask.method["config"]["ru"] == 0.2
    assert mask.summary()["classes"]["RU"] == round(0.2 * mask.n_units)
    assert mask.method["data"]["n_safety"] == 3  # the held-apart rows are not in the statistics
    assert all(torch.equal(p, before[k]) for k, p in llama.named_parameters())
