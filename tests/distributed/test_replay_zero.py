"""Refusal replay under DeepSpeed ZeRO-2 on 2 CPU ranks, with SSAHCallback freezing (fp32 and bf16).

The replay is a dataset change, so what must hold under ZeRO is: the distributed sampler serves every replayed row
(the two ranks together), the share of the mixed dataset is exact, and the frozen units stay bit-exact on every
rank's master weights and model copy.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from .launch import NPROC, launch  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
SCENARIOS = ["replay-z2-fp32", "replay-z2-bf16"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("replay_zero"), SCENARIOS, timeout=560,
                  worker=Path(__file__).with_name("replay_worker.py"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_replay_zero2_serves_refusals_and_keeps_frozen_units(job, scenario):
    marks = job.markers(scenario)
    for m in marks:
        assert m["ok"], f"{m.get('error_type')}: {m.get('traceback')}"
        assert m["rows"] == 33 and m["n_replay"] == 3  # round(0.1 * 30 / 0.9) = 3 refusal rows
        assert m["drift_master"] == 0.0 and m["drift_model"] == 0.0 and m["checked_master"] > 0
        assert m["moved"] > 0  # the other weights trained
    served = [s for m in marks for s in m["served"]]
    assert len(served) >= 33  # the sampler may pad to a multiple of the world size, never drop
    assert all(r in served for r in marks[0]["replay_ids"])
    assert sum(s in marks[0]["replay_ids"] for s in served) <= 3 + NPROC  # at most the padding repeats
