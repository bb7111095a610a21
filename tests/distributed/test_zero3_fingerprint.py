"""ZeRO-3 fingerprinting from each rank's partition, on 2 CPU ranks: no whole tensor is gathered for it.

One launch of ``fingerprint_worker.py`` (see its docstring for the scenarios). What must hold on every rank: the
right model passes, a model with other weights is refused with the fingerprint error (raw engines and the Trainer
callback at ``on_init_end``), the samples combined from the partitions equal those of the gathered tensors bit for
bit (padded last partitions included), and the only collective of the fingerprint step is one all_reduce of
``tensors x 32`` values.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from .launch import NPROC, launch  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCENARIOS = ["fpraw-z3-fp32", "fpraw-z3-bf16", "fpraw-z3-fp32-other", "fptrainer-z3-fp32",
             "fptrainer-z3-fp32-other"]
N_SAMPLES = 32


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("zero3_fingerprint"), SCENARIOS, timeout=560,
                  worker=Path(__file__).with_name("fingerprint_worker.py"))


def _ok(m: dict, where: str) -> dict:
    assert m["ok"], f"{where}: {m.get('error_type')}: {m.get('traceback')}"
    return m


def _one_small_all_reduce(log: list, n_tensors: int, where: str) -> None:
    assert log == [["all_reduce", n_tensors * N_SAMPLES]], f"{where}: collectives {log}"


@pytest.mark.parametrize("scenario", ["fpraw-z3-fp32", "fpraw-z3-bf16"])
def test_samples_come_from_the_partitions_without_a_gather(job, scenario):
    for rank, marker in enumerate(job.markers(scenario)):
        m = _ok(marker, f"{scenario} rank {rank}")
        where = f"{scenario} rank {rank}"
        assert m["patch_catches_gather"], f"{where}: the no-gather patch does not catch a gather"
        assert m["partitioned"] > 0 and m["n_fingerprinted"] == 10, m
        _one_small_all_reduce(m["collectives_getter"], m["n_fingerprinted"], where)
        assert m["samples_equal_gathered"], f"{where}: samples differ from the gathered tensors'"
        assert m["odd_numel"] == [35, 5] and m["odd_partition"] == [18, 3]  # last partition padded
        _one_small_all_reduce(m["collectives_odd"], 2, where)
        assert m["odd_equal_gathered"], f"{where}: padded partitions give other samples"
        assert m["enforcer"] == "DeepSpeedEnforcer"
        assert m["other_error"] and "other weights" in m["other_error"], m["other_error"]


def test_untrained_fp32_samples_are_the_masks_bit_for_bit(job):
    """Nothing persisted (threshold 0): every value read from the partitions; the mask's own samples come back."""
    for rank, marker in enumerate(job.markers("fpraw-z3-fp32")):
        m = _ok(marker, f"rank {rank}")
        assert m["persisted"] == 0 and m["samples_equal_mask"]
        n = m["n_fingerprinted"]
        # the right mask, then the other one: one small all_reduce each, nothing else
        assert m["collectives_validate"] == [["all_reduce", n * N_SAMPLES]] * 2, m["collectives_validate"]


def test_trained_bf16_with_persistent_parameters_reads_the_partitions(job):
    """DeepSpeed's default persistence keeps small parameters whole after a step; the partitions still serve."""
    for rank, marker in enumerate(job.markers("fpraw-z3-bf16")):
        m = _ok(marker, f"rank {rank}")
        assert m["persisted"] == m["n_fingerprinted"]
        assert not m["samples_equal_mask"]  # one step trained: other values, the gathered ones matched above


@pytest.mark.parametrize("scenario", ["fpraw-z3-fp32-other", "fptrainer-z3-fp32-other"])
def test_other_weights_refused_on_every_rank_before_any_gather(job, scenario):
    markers = job.markers(scenario)
    assert len(markers) == NPROC
    for rank, m in enumerate(markers):
        assert not m["ok"], f"{scenario} rank {rank} should have been refused"
        assert m["error_type"] == "MaskMismatchError", m.get("traceback")
        assert "other weights" in m["error"] and "fingerprint" in m["error"]


def test_trainer_fingerprints_a_zero_init_model_at_init_end_and_trains_exactly(job):
    for rank, marker in enumerate(job.markers("fptrainer-z3-fp32")):
        m = _ok(marker, f"rank {rank}")
        assert m["partitioned_at_build"]  # zero.Init partitioned the model before the Trainer existed
        assert m["collectives_init"] == [["on_init_end", 0], ["all_reduce", 10 * N_SAMPLES]], m["collectives_init"]
        assert m["global_step"] == 3 and m["enforcer"] == "DeepSpeedEnforcer"
        assert m["drift_master"] == 0.0 and m["drift_model"] == 0.0 and m["enforcer_drift"] == 0.0
        assert m["checked_master"] > 0 and m["moved"] > 0.0
