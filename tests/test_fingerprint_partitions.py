"""The fingerprint's fixed positions, and the samples of a partitioned tensor summed over its partitions.

``core.fingerprint`` defines the 32 flat positions once (:func:`fingerprint_positions`); a host that holds one
contiguous range of a tensor's flattening (DeepSpeed ZeRO-3) takes the samples of its range
(:func:`partial_fingerprint_samples`), and the ranks' vectors summed must be the whole tensor's samples, bit for
bit, whatever the cut and the padding. The 2-rank ZeRO-3 job is ``tests/distributed/test_zero3_fingerprint.py``.
"""
from __future__ import annotations

import pytest
import torch

from ssah_plugin.core.fingerprint import (
    N_SAMPLES,
    fingerprint_mismatches,
    fingerprint_positions,
    fingerprint_samples,
    partial_fingerprint_samples,
)


def _old_positions(n: int) -> torch.Tensor:
    """The positions as masks were made before the positions became a function (kept: samples of old masks)."""
    return torch.linspace(0, max(n - 1, 0), N_SAMPLES).round().to(torch.int64)


@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 1000, 8192, 4864 * 896, 2**24 - 1, 2**24, 8960 * 1536])
def test_positions_are_those_masks_were_made_with(n):
    assert torch.equal(fingerprint_positions(n), _old_positions(n))


@pytest.mark.parametrize("n", [2**24 + 4, 4096 * 14336, 11008 * 4096, 18944 * 3584, 151936 * 896])
def test_positions_stay_inside_tensors_above_2_to_the_24(n):
    """float32 rounds the last position past the end of a 4096 x 14336 tensor (Llama-3-8B's MLP); clamped now."""
    old, pos = _old_positions(n), fingerprint_positions(n)
    assert int(old[-1]) > n - 1  # what used to raise IndexError
    assert int(pos.max()) == n - 1 and int(pos.min()) == 0
    assert torch.equal(pos[:-1], old[:-1])  # only the overflowing position moved


def test_a_tensor_of_n_samples_is_its_own_sample_set():
    """Why a host may hand the core check 32 samples in place of the tensor (``fingerprint_mismatches``' get)."""
    assert torch.equal(fingerprint_positions(N_SAMPLES), torch.arange(N_SAMPLES))
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    samples = fingerprint_samples(w)
    assert torch.equal(fingerprint_samples(samples), samples)
    other = fingerprint_samples(torch.randn(16, 24, generator=torch.Generator().manual_seed(1)))
    assert fingerprint_mismatches({"w": samples}, {"w": samples.clone()}.get) == []
    assert fingerprint_mismatches({"w": samples}, {"w": other}.get) == ["w"]


def test_empty_tensor_is_refused_with_a_message():
    with pytest.raises(ValueError, match="empty"):
        fingerprint_samples(torch.empty(0))


def _zero3_partitions(flat: torch.Tensor, world: int) -> list[tuple[torch.Tensor, int]]:
    """(local values, start) per rank, laid out as DeepSpeed's ``Init._partition_param``: equal partitions of the
    flattening padded to a multiple of the world size, the padding at the end of the last one."""
    numel = flat.numel()
    part = (numel + world - 1) // world
    padded = torch.cat([flat, torch.full((part * world - numel,), float("nan"), dtype=flat.dtype)])
    return [(padded[r * part:(r + 1) * part].clone(), r * part) for r in range(world)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 5), (5,), (128, 64), (33, 3), (1, 1), (40,)])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_partition_samples_sum_to_the_whole_tensors_bitwise(shape, world, dtype):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(world)).to(dtype)
    total = torch.zeros(N_SAMPLES)
    for local, start in _zero3_partitions(t.reshape(-1), world):
        part = partial_fingerprint_samples(local, start, t.numel())
        assert part.dtype == torch.float32 and part.shape == (N_SAMPLES,)
        total += part  # the all_reduce (sum); the NaN padding is never read
    assert torch.equal(total, fingerprint_samples(t))


def test_a_range_without_positions_contributes_zeros():
    t = torch.randn(1000)
    part = partial_fingerprint_samples(t[1:30], 1, 1000)  # between positions 0 and 32
    assert torch.equal(part, torch.zeros(N_SAMPLES))
