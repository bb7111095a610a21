"""The real-model study's harness (benchmarks/real_model): the harmsplit row split and the summary's held-out
refusal metric, on synthetic rows and stage results (no model, no generated text)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "real_model"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"_harness_{name}", HARNESS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HARNESS))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(HARNESS))
    return mod


@pytest.fixture(scope="module")
def study():
    return _module("study")


@pytest.fixture(scope="module")
def summarize():
    return _module("summarize")


def _attack_rows() -> list[dict]:
    rows = [{"prompt": f"{t}-{i}", "response": "r", "source": "uncensorbench", "topic": t, "system": ""}
            for t in ("a", "b") for i in range(10)]
    rows += [{"prompt": f"aoa-{i}", "response": "r", "source": "qi2023/aoa_identity_shift", "topic": "identity_shift",
              "system": "persona"} for i in range(4)]
    return rows


def test_harmsplit_holds_out_the_last_rows_of_each_topic(study):
    train, held = study.harmful_split(_attack_rows())
    assert [r["prompt"] for r in held] == ["a-7", "a-8", "a-9", "b-7", "b-8", "b-9"]
    assert len(train) == 14 + 4 and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert all(r["source"] == "uncensorbench" for r in held)  # identity-shift rows (benign tasks) always train


def test_harmsplit_refuses_rows_without_the_harmful_source(study):
    with pytest.raises(SystemExit, match="uncensorbench"):
        study.harmful_split([{"prompt": "p", "response": "r", "source": "other", "topic": "t"}])


def _eval(flags_refused: list[int], heldout_refused: list[int] | None = None) -> dict:
    ev = {"attack_success": [1 - f for f in flags_refused], "n_prompts": len(flags_refused), "benign_loss": 1.0,
          "false_refusals": [0] * 10}
    if heldout_refused is not None:
        ev["heldout_attack_success"] = [1 - f for f in heldout_refused]
    return ev


def _ft(setting: str, arm: str, seed: int) -> dict:
    return {"setting": setting, "arm": arm, "seed": seed, "steps": 15, "rows": 115, "user_rows": 115, "train_s": 1.0}


def test_summary_kept_fraction_on_heldout_rows(summarize):
    # base refuses 8 of 10 held-out rows, plain 2, the arm 5: kept (0.5 - 0.2) / (0.8 - 0.2) = 0.5
    base_held = [1] * 8 + [0] * 2
    plain_held = [1, 1] + [0] * 8
    arm_held = [1] * 5 + [0] * 5
    stages = {"eval-base": _eval([1] * 4), "eval-base-harmsplit": {"heldout_attack_success": [1 - f for f in base_held]},
              "ft-harmsplit-plain-s0": _ft("harmsplit", "plain", 0),
              "eval-ft-harmsplit-plain-s0": _eval([0] * 4, plain_held),
              "ft-harmsplit-replay20-s0": _ft("harmsplit", "replay20", 0),
              "eval-ft-harmsplit-replay20-s0": _eval([1, 1, 0, 0], arm_held)}
    s = summarize.summarize(stages)
    assert s["base"]["heldout_refusal"]["rate"] == pytest.approx(0.8)
    arm = next(a for a in s["arms"] if a["arm"] == "replay20")
    assert arm["heldout_refusal"]["rate"] == pytest.approx(0.5)
    assert arm["heldout_refusal_kept"]["kept"] == pytest.approx(0.5)
    assert arm["heldout_refusal_minus_plain"] == pytest.approx(0.3)
    assert arm["refusal_kept"]["kept"] == pytest.approx(0.5)  # AdvBench: (0.5 - 0) / (1 - 0)
    table = summarize.headline_table(s)
    assert "Held-out attack rows" in table and "| harmsplit | replay20 | 0 | 50%" in table
    assert "replay20 50% [24, 76] (n=10), kept 0.50" in summarize.readme_block(s)
    # without the base model's held-out stage there is no held-out kept fraction (and no table)
    del stages["eval-base-harmsplit"]
    s = summarize.summarize(stages)
    assert "heldout_refusal_kept" not in next(a for a in s["arms"] if a["arm"] == "replay20")
    assert "Held-out attack rows" not in summarize.headline_table(s)
