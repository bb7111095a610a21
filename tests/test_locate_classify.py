"""Classification on synthetic scores (exact sets), standardisation, auto-size logic, policies on located masks."""
from __future__ import annotations

import pytest
import torch

from ssah_plugin.core.mask import CLASS_CODES, Mask
from ssah_plugin.core.units import describe_units
from ssah_plugin.io.tiny import tiny_model
from ssah_plugin.locate import LocateConfig, build_mask, choose_sizes, classify, reclassify, standardize

SCU, UCU, CU, RU = (CLASS_CODES[k] for k in ("SCU", "UCU", "CU", "RU"))


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_classify_exact_sets_across_groups():
    # two groups; global ranking. s - u = [3, 0, -1, -2 | 1, 0.5, -3, 0]; s + u = [3, 0, 1, -4 | 1, -0.5, -1, 2]
    s = [_t(3, 0, 0, -3), _t(1, 0, -2, 1)]
    u = [_t(0, 0, 1, -1), _t(0, -0.5, 1, 1)]
    codes = classify(s, u, scu=2 / 8, ucu=1 / 8, ru=2 / 8)
    # SCU: two highest s-u -> g0u0 (3), g1u0 (1). RU (default order: second): lowest s+u -> g0u3 (-4), g1u2 (-1).
    # UCU (of the rest): lowest s-u -> g0u2 (-1) (g1u2 has -3 but RU took it first).
    assert codes[0].tolist() == [SCU, CU, UCU, RU]
    assert codes[1].tolist() == [SCU, CU, RU, CU]
    codes = classify(s, u, scu=2 / 8, ucu=1 / 8, ru=2 / 8, order=("SCU", "UCU", "RU"))
    assert codes[0].tolist() == [SCU, CU, CU, RU]
    assert codes[1].tolist() == [SCU, RU, UCU, CU]


def test_classify_overlap_order_is_configurable():
    s = [_t(0, 0, 5, -3)]
    u = [_t(0, 0, 0, 0)]
    # unit 3 has the lowest s-u AND the lowest s+u: the first class in the order takes it
    assert classify(s, u, scu=0, ucu=0.25, ru=0.25)[0].tolist() == [UCU, CU, CU, RU]
    assert classify(s, u, scu=0, ucu=0.25, ru=0.25, order=("SCU", "RU", "UCU"))[0].tolist() == [UCU, CU, CU, RU]
    assert classify(s, u, scu=0, ucu=0.25, ru=0.25, order=("UCU", "SCU", "RU"))[0].tolist() == [RU, CU, CU, UCU]


def test_classify_ties_by_position_and_exact_sizes():
    s = [torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)]
    codes = classify(s, s, scu=0.2, ucu=0.2, ru=0.2)
    flat = torch.cat(codes).tolist()
    assert flat == [SCU, SCU, RU, RU, UCU, UCU, CU, CU, CU, CU]


def test_standardize_modes():
    g = [_t(1, 2, 3), _t(10, 10, 10)]
    z = standardize(g, "group")
    torch.testing.assert_close(z[0], _t(-1.224744871391589, 0, 1.224744871391589))
    assert torch.equal(z[1], torch.zeros(3, dtype=torch.float64))  # constant group -> zeros
    zg = torch.cat(standardize(g, "global"))
    assert abs(float(zg.mean())) < 1e-12 and abs(float(zg.std(unbiased=False)) - 1) < 1e-12
    assert torch.equal(standardize(g, "none")[1], g[1])
    with pytest.raises(ValueError):
        standardize(g, "log")


def test_config_validation_names_every_problem():
    with pytest.raises(ValueError) as e:
        LocateConfig(scu=1.5, batch_size=0, tokens="most")
    msg = str(e.value)
    assert "scu" in msg and "batch_size" in msg and "tokens" in msg


@pytest.fixture(scope="module")
def located():
    model = tiny_model("llama")
    groups = describe_units(model)
    torch.manual_seed(0)
    s = [torch.rand(g.n_units, dtype=torch.float64) for g in groups]
    u = [torch.rand(g.n_units, dtype=torch.float64) for g in groups]
    return model, build_mask(model, groups, s, u, LocateConfig())


def test_mask_round_trip_keeps_scores_classes_method(located, tmp_path):
    model, mask = located
    back = Mask.load(mask.save(tmp_path / "m.safetensors"))
    for k in mask.scores:
        assert all(torch.equal(a, b) for a, b in zip(mask.scores[k], back.scores[k]))
    assert all(torch.equal(a, b) for a, b in zip(mask.classes, back.classes))
    assert back.method == mask.method and back.default_policy == "ru-only"


@pytest.mark.parametrize("policy,expected", [
    ("none", 0), ("scu", 5), ("scu+cu", 5 + 271), ("scu+cu6", 5 + 23), ("scu+cu:0.06", 5 + 23),
    ("ru-only", 384 - 57), ("safety-top:0.1", 38),
])
def test_every_policy_with_a_located_mask(located, policy, expected):
    from ssah_plugin.hosts.callback import SSAHCallback

    model, mask = located
    sets = mask.frozen(policy)
    assert sum(int(s.sum()) for s in sets) == expected
    if policy.startswith("scu"):
        classes = torch.cat(mask.classes)
        frozen = torch.cat(sets)
        assert bool((frozen[classes == SCU]).all())  # every SCU frozen
        assert not bool(frozen[(classes == UCU) | (classes == RU)].any())
    cb = SSAHCallback(mask, policy=policy)
    assert cb is not None


def test_callback_freezes_a_located_mask(located):
    from ssah_plugin.core.engine import FreezeEngine
    from ssah_plugin.core.plan import plan_frozen_slices

    model, mask = located
    slices = plan_frozen_slices(mask, model, "scu+cu6")
    eng = FreezeEngine(slices, "tensor")
    eng.attach()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(input_ids=torch.tensor([[3, 4, 5, 6]]), labels=torch.tensor([[3, 4, 5, 6]])).loss.backward()
    opt.step()
    eng.after_step()
    assert eng.max_drift() == 0.0
    eng.detach()


def test_reclassify_changes_sizes_only(located):
    _, mask = located
    import copy

    m2 = reclassify(copy.deepcopy(mask), scu=0.05, ru=0.0)
    c = m2.summary()["classes"]
    assert c["SCU"] == round(0.05 * 384) and c["RU"] == 0
    assert m2.method["config"]["scu"] == 0.05
    assert all(torch.equal(a, b) for a, b in zip(mask.scores["safety_z"], m2.scores["safety_z"]))


def _fake_measure(table):
    calls = []

    def fn(cls, frac, scu):
        calls.append((cls, frac, scu))
        return table[(cls, frac)]

    return fn, calls


def test_choose_sizes_stops_at_thresholds():
    cfg = LocateConfig(auto_scu_grid=(0.01, 0.02, 0.03), auto_ru_grid=(0.1, 0.2, 0.3), auto_refusal_drop=0.5,
                       auto_utility_tolerance=0.1, auto_ru_refusal_tolerance=0.05)
    base = {"refusal_rate": 0.9, "benign_loss": 2.0}
    table = {("SCU", 0.01): {"refusal_rate": 0.8, "benign_loss": 2.0},
             ("SCU", 0.02): {"refusal_rate": 0.3, "benign_loss": 2.1},   # drop 0.6 >= 0.5, loss +5%: chosen
             ("RU", 0.1): {"refusal_rate": 0.9, "benign_loss": 2.05},
             ("RU", 0.2): {"refusal_rate": 0.88, "benign_loss": 2.1},   # within tolerances
             ("RU", 0.3): {"refusal_rate": 0.7, "benign_loss": 2.1}}    # refusal drop 0.2 > 0.05: stop
    fn, calls = _fake_measure(table)
    out = choose_sizes(base, fn, cfg)
    assert out["scu"] == 0.02 and out["ru"] == 0.2
    assert [c[:2] for c in calls] == [("SCU", 0.01), ("SCU", 0.02), ("RU", 0.1), ("RU", 0.2), ("RU", 0.3)]
    assert all(c[2] == 0.02 for c in calls if c[0] == "RU")  # RU swept next to the chosen SCU


def test_choose_sizes_keeps_default_when_no_refusals():
    cfg = LocateConfig(auto_scu_grid=(0.01,), auto_ru_grid=(0.1,))
    fn, calls = _fake_measure({("RU", 0.1): {"refusal_rate": 0.0, "benign_loss": 9.0}})
    with pytest.warns(UserWarning, match="refuses only"):
        out = choose_sizes({"refusal_rate": 0.1, "benign_loss": 1.0}, fn, cfg)
    assert out["scu"] == cfg.scu and out["ru"] == 0.0
