"""Policies: which units a mask freezes, computed from stored sets, classes and scores (exact expected sets)."""
from __future__ import annotations

import pytest
import torch

from ssah_plugin.core.classes import CLASS_CODES
from ssah_plugin.core.mask import Mask
from ssah_plugin.core.policies import PolicyError, resolve_policy
from ssah_plugin.core.units import SliceMap, UnitGroup

RU, SCU, UCU, CU = (CLASS_CODES[k] for k in ("RU", "SCU", "UCU", "CU"))


def _mask(classes=True, scores=True) -> Mask:
    """Two groups of 10 units (20 in all), no model needed."""
    groups = [UnitGroup(f"g{i}", "mlp", i, 10, "channel", f"g{i}.down", "linear", 1,
                        [SliceMap(f"g{i}.down", "weight", 1, "in", torch.arange(10).reshape(10, 1), (4, 10))])
              for i in range(2)]
    m = Mask(groups=groups, architecture="toy", model_class="Toy", config_hash="0")
    if classes:
        m.classes = [torch.tensor([SCU, CU, CU, RU, UCU, CU, RU, RU, SCU, CU], dtype=torch.uint8),
                     torch.tensor([CU, CU, RU, RU, RU, SCU, UCU, CU, RU, 255], dtype=torch.uint8)]
    if scores:
        m.scores["safety_z"] = [torch.arange(10, dtype=torch.float64), torch.arange(10, dtype=torch.float64) + 0.5]
        m.scores["utility_z"] = [torch.zeros(10, dtype=torch.float64), torch.full((10,), 5.0, dtype=torch.float64)]
    m.stored["explicit"] = [torch.arange(10) < 2, torch.zeros(10, dtype=torch.bool)]
    return m


def _units(sets) -> list[list[int]]:
    return [torch.nonzero(s).squeeze(1).tolist() for s in sets]


def test_stored_none_and_class_policies():
    m = _mask()
    assert _units(resolve_policy(m, "explicit")) == [[0, 1], []]
    assert _units(resolve_policy(m, "none")) == [[], []]
    assert _units(resolve_policy(m, "scu")) == [[0, 8], [5]]
    assert _units(resolve_policy(m, "scu+cu")) == [[0, 1, 2, 5, 8, 9], [0, 1, 5, 7]]
    assert _units(resolve_policy(m, "ru-only")) == [[0, 1, 2, 4, 5, 8, 9], [0, 1, 5, 6, 7, 9]]  # unknown stays frozen
    stored = resolve_policy(m, "explicit")
    stored[0][5] = True
    assert _units(resolve_policy(m, "explicit")) == [[0, 1], []]  # callers get copies


def test_scu_plus_top_cu_by_safety_importance():
    m = _mask()
    # CU safety_z: g0 units 1,2,5,9 -> 1,2,5,9; g1 units 0,1,7 -> 0.5,1.5,7.5. 10% of 20 units = 2 CU: 9 (g0), 7.5 (g1)
    want = [[0, 8, 9], [5, 7]]
    assert _units(resolve_policy(m, "scu+cu10")) == want
    assert _units(resolve_policy(m, "scu+cu:0.1")) == want
    assert _units(resolve_policy(m, "scu+cu:1")) == _units(resolve_policy(m, "scu+cu"))
    assert _units(resolve_policy(m, "scu+cu0")) == _units(resolve_policy(m, "scu"))
    assert _units(resolve_policy(m, "scu+cu2.5")) == [[0, 8], [5]]  # round(0.5) == 0: half to even


def test_safety_top_by_difference():
    m = _mask()
    # I_S - I_U: g0 = 0..9, g1 = -4.5..4.5 -> top 3 of 20: g0 units 9, 8, 7
    assert _units(resolve_policy(m, "safety-top:0.15")) == [[7, 8, 9], []]
    assert _units(resolve_policy(m, "safety-top:0")) == [[], []]


def test_random_controls():
    m = _mask()
    r = resolve_policy(m, "random:0.25")
    assert sum(int(x.sum()) for x in r) == 5 and _units(r) == _units(resolve_policy(m, "random:0.25"))  # fixed seed
    assert _units(resolve_policy(m, "random:0")) == [[], []]
    assert _units(resolve_policy(m, "random:1")) == [list(range(10))] * 2
    ref = resolve_policy(m, "ru-only")
    like = resolve_policy(m, "random-like:ru-only")
    assert [int(x.sum()) for x in like] == [int(x.sum()) for x in ref] == [7, 6]  # same count in every group
    assert _units(like) != _units(ref)  # other units (seed 0; a fixed draw, so this cannot flake)
    assert _units(resolve_policy(m, "random-like:scu+cu10")) == _units(resolve_policy(m, "random-like:scu+cu10"))
    with pytest.raises(PolicyError, match="unknown policy 'nope'"):
        resolve_policy(m, "random-like:nope")
    m.scores["decision_z"] = [torch.zeros(10, dtype=torch.float64), -torch.arange(10, dtype=torch.float64)]
    union = resolve_policy(m, "scu+decision:0.1")  # SCU [[0, 8], [5]] | top 2 decision [[0, 1], []]
    assert _units(union) == [[0, 1, 8], [5]]
    like_union = resolve_policy(m, "random-like:scu+decision:0.1")  # the whole union is the reference
    assert [int(x.sum()) for x in like_union] == [3, 1]
    misread = [a | b for a, b in zip(resolve_policy(m, "random-like:scu"), resolve_policy(m, "decision:0.1"))]
    assert _units(like_union) != _units(misread)


@pytest.mark.parametrize("policy, match", [
    ("scu+everything", r"unknown policy 'scu\+everything'; this mask stores \['explicit'\]"),
    ("scu+cu:1.5", r"fraction 1.5 is outside \[0, 1\]"),
    ("safety-top:abc", r"'abc' is not a number"),
    ("random:2", r"fraction 2.0 is outside \[0, 1\]"),
    ("", "non-empty string"),
])
def test_bad_policies(policy, match):
    with pytest.raises(PolicyError, match=match):
        resolve_policy(_mask(), policy)


def test_policies_needing_what_the_mask_lacks():
    with pytest.raises(PolicyError, match="needs unit classes.*ssah-plugin locate"):
        resolve_policy(_mask(classes=False), "scu")
    with pytest.raises(PolicyError, match="needs the 'safety_z' scores"):
        resolve_policy(_mask(scores=False), "scu+cu6")
    with pytest.raises(PolicyError, match="needs the 'utility_z' scores"):
        m = _mask()
        del m.scores["utility_z"]
        resolve_policy(m, "safety-top:0.1")
    assert isinstance(PolicyError("x"), ValueError)
