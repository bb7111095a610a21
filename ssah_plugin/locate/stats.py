"""Calibration statistics: per-channel running mean and variance of the inputs of each output projection.

A forward pre-hook on each group's output projection ``B`` (``down_proj`` / ``o_proj`` / GPT-2 ``c_proj``) takes the
counted positions of the batch and merges their per-channel moments into a running state (:class:`ChannelStats`).
Hooks run during the forward pass, before ``B`` computes its output; there is no backward.

Numerics (ready for GPUs): each batch's mean and M2 are computed in the activations' precision but at least float32
(bf16 / fp16 activations are promoted inside the subtraction, float64 ones stay float64), around a shift (the
running mean, or the batch's first row for the first batch) so a channel with a large offset loses no precision to
cancellation; the batch moments are then merged into a float64 state with Chan et al.'s parallel update. No float64
copy of the activations is made. The hook never synchronises with the device: the counted positions arrive as an
index tensor built on the host with the batch, the token count is a shape, and the state stays on the activations'
device until :meth:`ChannelStats.variance` is read at the end.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from ssah_plugin.core.units import UnitGroup, unwrap_model
from ssah_plugin.data.rows import EncodedPair
from ssah_plugin.errors import DataError
from ssah_plugin.io.models import model_device

__all__ = ["ChannelStats", "StatsCollector", "batches", "counted_batches", "n_batches", "progress_bar",
           "collect_stats"]


class ChannelStats:
    """Running per-channel count, mean and M2 (sum of squared deviations), merged batch by batch.

    State: ``n`` (a Python int) and ``mean`` / ``m2`` (float64, ``[dim]``, on the device of the data).
    :meth:`update` computes the batch moments around a shift in ``promote_types(x.dtype, float32)`` with one fused
    ``torch.var_mean`` and merges them (Chan et al.): ``O(dim)`` memory whatever the number of tokens.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the rows of ``x`` (``[n, dim]``). Never synchronises with the device."""
        nb = int(x.shape[0])
        if nb == 0:
            return
        if self.mean.device != x.device:
            self.mean, self.m2 = self.mean.to(x.device), self.m2.to(x.device)
        if nb == 1:  # one row is its own mean, exactly (e.g. one prompt-end position per batch)
            mb, m2b = x[0].to(torch.float64), None
        else:
            work = torch.promote_types(x.dtype, torch.float32)
            shift = self.mean.to(work) if self.n else x[0].to(work)
            var_b, mean_d = torch.var_mean(x - shift, 0, correction=0)  # batch moments around the shift, one pass
            mb = shift.to(torch.float64) + mean_d.to(torch.float64)
            m2b = var_b.to(torch.float64) * nb
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * (nb / n)
        self.m2 += delta.square() * (self.n * nb / n) if m2b is None else m2b + delta.square() * (self.n * nb / n)
        self.n = n

    def variance(self) -> torch.Tensor:
        """Population variance (divide by N) on the CPU; zeros if nothing was counted."""
        if self.n == 0:
            return torch.zeros_like(self.m2, device="cpu")
        return (self.m2 / self.n).cpu()


class StatsCollector:
    """Forward pre-hooks on each group's output projection ``B`` that feed :class:`ChannelStats`.

    Set :attr:`select` before each forward pass: the flat indices (``[k]`` int64, positions of the flattened
    ``[batch * seq]``) of the positions to count, as :func:`counted_batches` yields them, or None to count every
    position. A boolean ``[batch * seq]`` mask is accepted too (converted once per batch, which synchronises on a
    GPU). The hook runs when ``B`` is called, during the forward, before ``B`` computes its output. Use as a
    context manager.
    """

    def __init__(self, root: nn.Module, groups: Sequence[UnitGroup]) -> None:
        self.root = root
        self.modules: dict[str, nn.Module] = {}
        for g in groups:
            if g.score_module not in self.modules:
                self.modules[g.score_module] = root.get_submodule(g.score_module)
        self.stats: dict[str, ChannelStats] = {}
        self._index: torch.Tensor | None = None
        self._handles: list = []

    @property
    def select(self) -> torch.Tensor | None:
        return self._index

    @select.setter
    def select(self, value: torch.Tensor | None) -> None:
        if value is not None and value.dtype == torch.bool:
            value = value.reshape(-1).nonzero().squeeze(1)
        self._index = value

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if self._index is not None:
                x = x.index_select(0, self._index.to(x.device, non_blocking=True))
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = ChannelStats(x.shape[-1], x.device)
            st.update(x)

        return hook

    def __enter__(self) -> "StatsCollector":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def variance(self, module_name: str) -> torch.Tensor:
        st = self.stats.get(module_name)
        if st is None or st.n == 0:
            raise DataError(f"no calibration token reached {module_name}; the calibration data is empty after "
                            "masking (check --tokens and --max-length)")
        return st.variance()


def _host_batches(encoded: Sequence[EncodedPair], batch_size: int,
                  pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        cnt = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[r, :n] = torch.tensor(e.input_ids)
            att[r, :n] = 1
            cnt[r, :n] = torch.tensor(e.count)
        yield ids, att, cnt


def _to(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host tensor to ``device``; to a GPU through pinned memory without waiting for the copy."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def batches(encoded: Sequence[EncodedPair], batch_size: int, pad_id: int,
            device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded batches ``(input_ids, attention_mask, count)`` in a fixed order (longest first, stable).

    Padding positions are never counted (``count`` is False there); with causal attention and right padding the
    real positions are unaffected by padding.
    """
    for ids, att, cnt in _host_batches(encoded, batch_size, pad_id):
        yield _to(ids, device), _to(att, device), _to(cnt, device)


def counted_batches(encoded: Sequence[EncodedPair], batch_size: int, pad_id: int,
                    device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`batches` with the flat indices of the counted positions (built on the host) instead of the mask:
    what :attr:`StatsCollector.select` takes."""
    for ids, att, cnt in _host_batches(encoded, batch_size, pad_id):
        index = cnt.reshape(-1).nonzero().squeeze(1)
        yield _to(ids, device), _to(att, device), _to(index, device)


def n_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def progress_bar(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    """``tqdm`` over ``iterable`` if ``enabled`` (a progress bar is a runtime setting: nothing else changes)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


@torch.no_grad()
def collect_stats(model: nn.Module, groups: Sequence[UnitGroup], encoded: Sequence[EncodedPair], *,
                  batch_size: int, pad_id: int, desc: str = "calibration", progress: bool = True) -> StatsCollector:
    """Run the decoder stack (no LM head) over ``encoded`` and return the filled collector."""
    root = unwrap_model(model)
    body = getattr(root, "base_model", root)  # the decoder without lm_head: its logits are never needed
    device = model_device(root)
    was_training = root.training
    root.eval()
    collector = StatsCollector(root, groups)
    try:
        with collector:
            for ids, att, index in progress_bar(counted_batches(encoded, batch_size, pad_id, device),
                                                n_batches(len(encoded), batch_size), desc, progress):
                collector.select = index
                body(input_ids=ids, attention_mask=att, use_cache=False)
    finally:
        root.train(was_training)
    return collector
