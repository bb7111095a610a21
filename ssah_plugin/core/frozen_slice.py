"""The unit of enforcement: one parameter's frozen indices along one axis (what planning produces)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["FrozenSlice"]


@dataclass
class FrozenSlice:
    """Indices ``index`` along ``axis`` of ``param`` that must never change.

    ``fill`` is ``None`` to keep the values the parameter has when enforcement starts (snapshot), or a number the
    slice must always equal (LoRA rows/columns kept at zero).
    """

    name: str
    param: nn.Parameter
    axis: int
    index: torch.Tensor  # int64, sorted, unique, on the parameter's device
    fill: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        shape = tuple(getattr(self.param, "ds_shape", None) or self.param.shape)
        other = 1
        for d, n in enumerate(shape):
            if d != self.axis:
                other *= n
        return int(self.index.numel()) * other
