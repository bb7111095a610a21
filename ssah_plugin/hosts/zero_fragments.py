"""Where a frozen slice's values fall inside one contiguous fragment of a flattened tensor: a few blocks, by arithmetic.

ZeRO keeps every parameter as flat pieces: ZeRO-1/2 give each rank a contiguous range of the row-major flattening
(``param._hp_mapping``), ZeRO-3 gives rank ``r`` the range ``[r * part, (r + 1) * part)``. A frozen slice is
``index`` along ``axis`` of a tensor of ``shape``. Seen as ``(outer, D, inner)`` with ``D = shape[axis]``, the flat
position ``o * D * inner + i * inner + j`` is frozen iff ``i`` is in ``index``. Any contiguous range is covered by at
most seven :class:`Block` views ``(a, b, c)`` of itself, each selecting rows along its middle dimension with an index of
at most ``len(index)`` entries: whole outer rows (``index`` itself), whole inner rows of one partial outer row (the
indices in range), and at most four partial inner rows (taken whole or not at all). So the memory per fragment is the
frozen values plus a few small indices, never one int64 per frozen element, and a restore is one ``index_copy_`` per
block (one per fragment when the fragment holds whole rows, as most ZeRO-1/2 fragments do).

Framework-free: plain torch, used by :mod:`ssah_plugin.hosts.deepspeed` at set-up (planning) and inside the optimizer
step (restore).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Block", "FragmentPiece", "plan_blocks"]


@dataclass(frozen=True, eq=False)
class Block:
    """``frag.narrow(0, offset, a * b * c).view(a, b, c)``, rows ``index`` along dim 1."""

    offset: int
    a: int
    b: int
    c: int
    index: torch.Tensor  # int64, 1-D

    @property
    def numel(self) -> int:
        return self.a * int(self.index.numel()) * self.c

    def view(self, frag: torch.Tensor) -> torch.Tensor:
        return frag.narrow(0, self.offset, self.a * self.b * self.c).view(self.a, self.b, self.c)


def plan_blocks(shape: tuple[int, ...], axis: int, index: torch.Tensor, start: int, numel: int) -> list[Block]:
    """Blocks covering exactly the frozen positions of ``index`` along ``axis`` inside flat ``[start, start+numel)``.

    Offsets are relative to ``start``; positions past the tensor's end (ZeRO-3 padding) are ignored.
    """
    outer, d, inner = math.prod(shape[:axis]), int(shape[axis]), math.prod(shape[axis + 1:])
    rows = torch.unique(index.detach().to("cpu", torch.int64))  # sorted
    length = d * inner
    s, e = max(start, 0), min(start + numel, outer * length)
    out: list[Block] = []
    if s >= e or rows.numel() == 0:
        return out
    frozen = set(rows.tolist())

    def whole_inner_row(i: int, lo: int, hi: int, base: int) -> None:  # part [lo, hi) of inner row i, taken or not
        if hi > lo and i in frozen:
            out.append(Block(base + i * inner + lo - s, 1, 1, hi - lo, torch.zeros(1, dtype=torch.int64)))

    def in_outer_row(o: int, u: int, v: int) -> None:  # positions [u, v) of outer row o (0 <= u < v <= length)
        base = o * length
        i0, r0 = divmod(u, inner)
        i1, r1 = divmod(v, inner)
        if i0 == i1:
            whole_inner_row(i0, r0, r1, base)
            return
        if r0:
            whole_inner_row(i0, r0, inner, base)
            i0 += 1
        if i1 > i0:
            local = rows[(rows >= i0) & (rows < i1)] - i0
            if local.numel():
                out.append(Block(base + i0 * inner - s, 1, i1 - i0, inner, local.contiguous()))
        whole_inner_row(i1, 0, r1, base)

    o0, u = divmod(s, length)
    o1, v = divmod(e, length)
    if o0 == o1:
        in_outer_row(o0, u, v)
        return out
    if u:
        in_outer_row(o0, u, length)
        o0 += 1
    if o1 > o0:
        out.append(Block(o0 * length - s, o1 - o0, d, inner, rows))
    if v:
        in_outer_row(o1, 0, v)
    return out


@dataclass
class FragmentPiece:
    """One frozen slice's share of one local 1-D tensor: its blocks and the values to keep there.

    ``values`` holds one tensor per block (shape ``(a, len(index), c)``), or is ``None`` for a fixed-fill slice
    (LoRA rows/columns kept at ``fill``). ``get`` re-reads the local tensor (outside the step: checks, set-up); inside
    the step the enforcer passes the tensor the optimizer has just updated.
    """

    get: Callable[[], torch.Tensor | None]  # None: this copy is not materialised on this rank now
    blocks: list[Block]
    values: list[torch.Tensor] | None
    fill: float | None = None

    @classmethod
    def record(cls, get: Callable[[], torch.Tensor], blocks: list[Block], fill: float | None) -> FragmentPiece:
        """Read the current values of ``blocks`` in ``get()`` (or keep only ``fill``)."""
        frag = get()
        on = [Block(b.offset, b.a, b.b, b.c, b.index.to(frag.device)) for b in blocks]
        if fill is not None:
            return cls(get, on, None, fill)
        with torch.no_grad():
            values = [b.view(frag).index_select(1, b.index).clone() for b in on]
        return cls(get, on, values)

    def sharing(self, get: Callable[[], torch.Tensor]) -> FragmentPiece:
        """The same positions and values in another copy (e.g. the model's bf16 copy of an fp32 master fragment)."""
        return FragmentPiece(get, self.blocks, self.values, self.fill)

    @property
    def numel(self) -> int:
        """How many frozen positions this piece covers."""
        return sum(b.numel for b in self.blocks)

    @property
    def index_nbytes(self) -> int:
        return sum(b.index.numel() * b.index.element_size() for b in self.blocks)

    @property
    def nbytes(self) -> int:
        """Memory held: the kept values plus the block indices."""
        return sum(v.numel() * v.element_size() for v in self.values or []) + self.index_nbytes

    @torch.no_grad()
    def restore(self, frag: torch.Tensor | None = None) -> None:
        """Write the kept values into ``frag`` (default ``get()``), cast to its dtype (exact for the model copy)."""
        frag = self.get() if frag is None else frag
        if frag is None:
            return
        for k, b in enumerate(self.blocks):
            if self.values is None:
                b.view(frag).index_fill_(1, b.index, self.fill)
            else:
                b.view(frag).index_copy_(1, b.index, self.values[k].to(frag.dtype))

    @torch.no_grad()
    def drift(self, frag: torch.Tensor | None = None) -> float:
        """Largest absolute change of a kept value in ``frag`` (0.0 when bitwise equal, or nothing to check)."""
        frag = self.get() if frag is None else frag
        worst = 0.0
        if frag is None:
            return worst
        for k, b in enumerate(self.blocks):
            cur = b.view(frag).index_select(1, b.index)
            ref = torch.full_like(cur, self.fill) if self.values is None else self.values[k].to(cur.dtype)
            if not torch.equal(cur, ref):
                worst = max(worst, float((cur.double() - ref.double()).abs().max()))
        return worst
