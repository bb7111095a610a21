"""TokenwiseConstraint on 2 CPU ranks under DeepSpeed ZeRO-2 (and ZeRO-1, DDP), with SSAHCallback; ZeRO-3 refused.

One launch runs the scenarios of ``constrained_worker.py`` in sequence; the assertions read each rank's marker
(DeepSpeed on CPU occasionally aborts at process exit after the work is done, so the exit code is not trusted).
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("trl")

from .launch import launch  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("constrained_worker.py")
SCENARIOS = ["trainer-z2-fp32", "sft-z2-bf16", "trainer-z1-fp32", "sft-ddp-fp32", "trainer-z3-fp32"]
TRAINED = ["trainer-z2-fp32", "sft-z2-bf16", "trainer-z1-fp32", "sft-ddp-fp32"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("constrained_zero"), SCENARIOS, timeout=560, worker=WORKER)


@pytest.mark.parametrize("scenario", TRAINED)
def test_constrained_loss_and_frozen_units(job, scenario):
    for rank, m in enumerate(job.markers(scenario)):
        where = f"{scenario} rank {rank}"
        assert m["ok"], f"{where}: {m.get('error_type')}: {m.get('traceback')}"
        assert m["global_step"] == 3 and m["calls"] == 6, where  # 3 steps x accumulation 2, on every rank
        # step 1: policy == reference (same dtype, same inputs), so every log-ratio is 0 and the loss is exact
        assert m["logratio_first"] == [0.0], where
        assert m["losses"][0] == pytest.approx(m["expected_first_loss"], rel=1e-6), where
        assert m["losses"][-1] != m["losses"][0], where
        # the reference: never changed, never trainable, in the training model's dtype (bf16 engine -> bf16)
        assert m["ref_bitwise"] and m["ref_drift"] == 0.0 and not m["ref_requires_grad"], where
        assert m["ref_dtype"] == m["model_dtype"] == ("torch.bfloat16" if "bf16" in scenario else "torch.float32")
        # composition with freezing: frozen units bit-exact in the fp32 master and the model copy
        assert m["enforcer"] == ("FreezeEngine" if "-ddp-" in scenario else "DeepSpeedEnforcer"), where
        assert m["checked"] > 0 and m["drift_master"] == 0.0 and m["drift_model"] == 0.0, where
        assert m["enforcer_drift"] == 0.0 and m["moved"] > 0.0, where
        assert m["host_optimizer"] == ("AdamW" if "-ddp-" in scenario else "DeepSpeedZeroOptimizer"), where


def test_ranks_agree_on_logged_loss(job):
    for scenario in TRAINED:
        a, b = job.markers(scenario)
        assert a["losses"] == b["losses"], scenario  # the Trainer logs the mean over ranks


def test_zero3_refused_at_setup(job):
    for rank, m in enumerate(job.markers("trainer-z3-fp32")):
        assert not m["ok"], f"rank {rank} should have been refused"
        assert m["error_type"] == "UnsupportedSetupError", m.get("traceback")
        assert "ZeRO-3" in m["error"] and "Fix: use ZeRO-2" in m["error"]
