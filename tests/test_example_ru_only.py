"""examples/ru_only_alignment_budget.py: SFT that trains only the redundant units of a tiny base model.

The example's own checks are bitwise (non-RU unit slices and non-unit tensors unchanged, RU changed); these tests
run it in-process on the tiny default and also show that the checks fail when nothing is frozen.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location("ru_only_alignment_budget", EXAMPLES / "ru_only_alignment_budget.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def ru_run(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("ru_only")
    rc = example.main(["--out", str(out), "--steps", "3", "--samples", "16"])
    return rc, out, json.loads((out / "summary.json").read_text())


def test_ru_only_trains_only_redundant_units(ru_run):
    rc, out, s = ru_run
    assert rc == 0
    assert s["policy"] == "ru-only"
    assert s["max_drift"] == 0.0
    assert s["non_ru_slices_changed"] == 0
    assert s["ru_slices_changed"] > 0
    assert s["non_unit_tensors_changed"] == []
    assert 0 < s["ru_units"] < s["units"]
    assert s["frozen_fraction"] == pytest.approx(1 - s["ru_units"] / s["units"])


def test_checks_fail_without_freezing(example, ru_run, tmp_path):
    _, out, _ = ru_run
    rc = example.main(["--out", str(tmp_path), "--steps", "3", "--samples", "16", "--policy", "none",
                       "--mask", str(out / "mask.safetensors")])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 1
    assert s["non_ru_slices_changed"] > 0
