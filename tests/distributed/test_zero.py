"""Real 2-rank CPU jobs: frozen units stay bit-exact under DeepSpeed ZeRO-1/2/3 and DDP, on every rank.

Three launches (one per ZeRO family; each worker runs its scenarios in sequence to pay the start-up once). Every
scenario trains 3 optimizer steps with gradient accumulation 2, AdamW weight decay 0.1, lr 1e-2 and grad clipping,
then each rank reads the frozen slices back from the fp32 master weights and from the model's copy and compares them
with the values saved before training. ``*-control`` runs the same job without the plugin: the check must see drift.
"""
from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("trl")

from .launch import NPROC, backend, launch  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAUNCHES: dict[str, list[str]] = {
    "zero2": ["trainer-z2-fp32", "trainer-z2-fp32-control", "trainer-z2-bf16-dsopt", "sft-z2-bf16", "dpo-z2-fp32",
              "sft-z2-bf16-lora", "raw-z2-fp32", "trainer-z2-bf16-resume", "trainer-z2-fp32-offload",
              "trainer-z2-fp32-ssahopt", "trainer-z2-fp32-ssahopt-dsopt", "raw-z2-fp32-offload", "raw-z0-bf16",
              "raw-z0-fp32", "sft-z2-fp32", "dpo-z2-bf16", "trainer-z2-fp32-resume-noplugin",
              "trainer-z2-bf16-resume-wider", "trainer-z2-fp32-resume-addcb"],
    "zero3": ["trainer-z3-bf16", "sft-z3-fp32", "dpo-z3-bf16", "sft-z3-fp32-lora", "raw-z3-bf16-resume",
              "trainer-z3-fp32-resume", "sft-z3-bf16-gc", "dpo-z3-fp32"],
    "zero1_ddp": ["trainer-ddp-fp32", "sft-ddp-bf16", "trainer-z1-fp32", "trainer-z1-bf16", "sft-z1-bf16",
                  "dpo-z1-fp32", "trainer-ddp-bf16", "sft-ddp-fp32", "dpo-ddp-fp32", "sft-z1-fp32", "dpo-z1-bf16"],
}
REFUSED = {
    "trainer-z2-fp32-offload": "offload",
    "raw-z2-fp32-offload": "offload",
    "raw-z0-bf16": "stage to 1, 2 or 3",
    "trainer-z2-fp32-ssahopt": "SSAHCallback",
    "trainer-z2-fp32-ssahopt-dsopt": "SSAHCallback",
}
#: resumes that must be refused at train() start, on every rank: scenario -> (error class, text in the message)
REFUSED_RESUME = {
    "trainer-z2-fp32-resume-noplugin": ("FrozenValuesError", "not the mask's base values"),
    "trainer-z2-bf16-resume-wider": ("ResumeMismatchError", "another frozen set"),
    "trainer-z2-fp32-resume-addcb": ("FrozenValuesError", "not the mask's base values"),
}
CONTROLS = {"trainer-z2-fp32-control"}
EXACT = [s for names in LAUNCHES.values() for s in names
         if s not in REFUSED and s not in CONTROLS and s not in REFUSED_RESUME]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Launches run lazily, once per module, the first time a test needs them."""
    cache: dict = {}

    def get(scenario: str):
        key = next(k for k, names in LAUNCHES.items() if scenario in names)
        if key not in cache:
            cache[key] = launch(tmp_path_factory.mktemp(key), LAUNCHES[key], timeout=800 if key == "zero2" else 560)
        return cache[key]

    return get


def _ok(marker: dict, scenario: str, rank: int) -> dict:
    assert marker["ok"], f"{scenario} rank {rank} failed: {marker.get('error_type')}: {marker.get('traceback')}"
    return marker


def _assert_exact(m: dict, where: str, lora: bool) -> None:
    assert m["checked_master"] > 0 and m["checked_model"] > 0, where
    assert m["drift_master"] == 0.0, f"{where}: fp32 master drift {m['drift_master']}"
    assert m["drift_model"] == 0.0, f"{where}: model copy drift {m['drift_model']}"
    assert m["enforcer_drift"] == 0.0, f"{where}: enforcer's own check {m['enforcer_drift']}"
    if lora:
        assert m["lora_b_max"] > 0.0, f"{where}: LoRA adapters did not train"
    else:
        assert m["moved"] > 0.0, f"{where}: unfrozen weights did not move"


@pytest.mark.parametrize("scenario", EXACT)
def test_frozen_units_exact_on_every_rank(jobs, scenario):
    job = jobs(scenario)
    lora = "lora" in scenario.split("-")
    for rank, marker in enumerate(job.markers(scenario)):
        m = _ok(marker, scenario, rank)
        _assert_exact(m, f"{scenario} rank {rank}", lora)
        expected_steps = 4 if "resume" in scenario and scenario.startswith(("trainer", "sft", "dpo")) else 3
        assert m["global_step"] == expected_steps
        if "per_step_drift" in m:  # checked after every optimizer step, not only at the end
            assert len(m["per_step_drift"]) == m["global_step"] > 0
            assert all(d == 0.0 for d in m["per_step_drift"]), m["per_step_drift"]
        if "first_phase" in m:  # the checkpoint that was resumed from was exact too
            _assert_exact(m["first_phase"], f"{scenario} rank {rank} before save", lora)
        if "after_resume" in m:
            _assert_exact(m["after_resume"], f"{scenario} rank {rank} after load_checkpoint", lora)
        if "-z" in scenario and not scenario.startswith("raw-z0"):
            assert m["enforcer"] == "DeepSpeedEnforcer"
            assert m["restores"] >= 3  # the restore ran inside every optimizer step
            # memory: positions as block indices, not one int64 per frozen element (the layout before: 8 bytes each);
            # full-size layers need under a byte per element, rank-4 LoRA factors a few
            assert 0 < m["index_bytes"] < 8 * m["recorded_elements"], m
            if not lora:
                assert m["index_bytes"] <= m["recorded_elements"], m
        if scenario.startswith("trainer-ddp") or scenario.startswith("sft-ddp"):
            assert m["enforcer"] == "FreezeEngine"
        stage = scenario.split("-")[1]  # the one ZeRO-stage query, on the live Trainer / engine
        assert m["zero_stage"] == (None if stage == "ddp" else int(stage[1:])), (scenario, m["zero_stage"])
        assert m["backend"] == backend()


def test_dsopt_scenario_really_used_deepspeed_optimizer(jobs):
    """The config 'optimizer' block replaces the Trainer's optimizer; the callback must hook DeepSpeed's instead."""
    for rank, marker in enumerate(jobs("trainer-z2-bf16-dsopt").markers("trainer-z2-bf16-dsopt")):
        m = _ok(marker, "trainer-z2-bf16-dsopt", rank)
        assert m["host_optimizer"][:2] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer"]


@pytest.mark.parametrize("scenario", [s for s in EXACT if "-z" in s and not s.startswith("raw-z0")])
def test_each_frozen_value_is_recorded_by_exactly_one_rank(jobs, scenario):
    """Under ZeRO-1/2/3 every rank keeps only the frozen values of its own partition: no replicated snapshot."""
    markers = [_ok(m, scenario, r) for r, m in enumerate(jobs(scenario).markers(scenario))]
    assert len({m["frozen_elements"] for m in markers}) == 1
    assert sum(m["recorded_elements"] for m in markers) == markers[0]["frozen_elements"] > 0


@pytest.mark.multi_gpu
def test_ranks_ran_on_their_own_gpu_with_nccl(jobs):
    """With two or more GPUs the same scenarios run under NCCL, one CUDA device per rank."""
    for scenario in ("trainer-z2-bf16-dsopt", "raw-z2-fp32"):
        markers = jobs(scenario).markers(scenario)
        assert [m["backend"] for m in markers] == ["nccl"] * NPROC
        assert [m["device"] for m in markers] == [f"cuda:{r}" for r in range(NPROC)]


@pytest.mark.parametrize("scenario", sorted(CONTROLS))
def test_without_plugin_the_check_sees_drift(jobs, scenario):
    for rank, marker in enumerate(jobs(scenario).markers(scenario)):
        m = _ok(marker, scenario, rank)
        assert m["drift_master"] > 0.0 and m["drift_model"] > 0.0


@pytest.mark.parametrize("scenario", sorted(REFUSED))
def test_unsupported_setups_refused_at_setup(jobs, scenario):
    markers = jobs(scenario).markers(scenario)
    assert len(markers) == NPROC
    for rank, m in enumerate(markers):
        assert not m["ok"], f"{scenario} rank {rank} should have been refused"
        assert m["error_type"] == "UnsupportedSetupError", m.get("traceback")
        assert REFUSED[scenario] in m["error"] and "Fix" in m["error"]


@pytest.mark.parametrize("scenario", sorted(REFUSED_RESUME))
def test_mismatching_resume_refused_on_every_rank(jobs, scenario):
    """Issue 11, item 1 under ZeRO-2: a resume that would freeze values other than the base's is refused."""
    error_type, text = REFUSED_RESUME[scenario]
    markers = jobs(scenario).markers(scenario)
    assert len(markers) == NPROC
    for rank, m in enumerate(markers):
        assert not m["ok"], f"{scenario} rank {rank} should have been refused"
        assert m["error_type"] == error_type, m.get("traceback")
        assert text in m["error"] and "Fix" in m["error"]


@pytest.mark.parametrize("trainer", ["sft"])
def test_recipe_under_accelerate_launch_with_shipped_configs(tmp_path, trainer):
    """integrations/recipes/trl_zero.py + integrations/accelerate/zero2.yaml (+ zero2.json) as a user would run them."""
    import json
    import os
    import subprocess
    import sys

    from .launch import ROOT, free_port, job_env

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "integrations/accelerate/zero2.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), str(ROOT / "integrations/recipes/trl_zero.py"), "--trainer", trainer, "--model", "tiny",
           "--output_dir", str(out), "--max_steps", "2", "--lr", "1e-2", "--no-bf16"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        log, _ = proc.communicate()
    summary = out / "ssah_summary.json"
    assert summary.exists(), log[-4000:]
    s = json.loads(summary.read_text())
    assert s["steps"] == 2 and s["max_drift"] == 0.0 and s["frozen_elements"] > 0
