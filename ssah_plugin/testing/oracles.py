"""Independent reference computations the tests compare the plugin against (torch only).

Everything here reads the mask through its stored unit indices (``mask.groups[i].slices[j].index``) and never goes
through the planner (:mod:`ssah_plugin.core.plan`) or the freeze engine, so a bug there cannot hide in the oracle.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["greedy_from_ids", "dense_frozen_masks", "frozen_values", "hand_mask_grads", "hand_restore",
           "clone_params"]


def greedy_from_ids(model: nn.Module, ids: list[int], n_new: int, eos) -> list[int]:
    """Unbatched greedy decoding, one full forward per token: the oracle for batched / cached generation."""
    out: list[int] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(torch.argmax(model(input_ids=torch.tensor([ids + out], device=device)).logits[0, -1]))
            if nxt in eos:
                break
            out.append(nxt)
    return out


def dense_frozen_masks(mask, model: nn.Module, policy: str | None = None) -> dict[str, torch.Tensor]:
    """Parameter name -> bool tensor (same shape and device as the parameter), True on frozen elements."""
    params = dict(model.named_parameters())
    dense: dict[str, torch.Tensor] = {}
    for g, frozen in zip(mask.groups, mask.frozen(policy)):
        for s in g.slices:
            m = dense.setdefault(s.name, torch.zeros_like(params[s.name], dtype=torch.bool))
            for u in torch.nonzero(frozen).squeeze(1).tolist():
                m.index_fill_(s.axis, s.index[u].to(m.device), True)
    return dense


def frozen_values(mask, model: nn.Module, policy: str | None = None) -> dict[str, torch.Tensor]:
    """``"group/parameter"`` -> a copy of that parameter's frozen slice, for every unit-bearing tensor."""
    params = dict(model.named_parameters())
    out = {}
    for g, frozen in zip(mask.groups, mask.frozen(policy)):
        units = frozen.nonzero().reshape(-1)
        for s in g.slices:
            if units.numel() and s.name in params:
                p = params[s.name].detach()
                out[f"{g.name}/{s.name}"] = p.index_select(s.axis, s.index[units].reshape(-1).to(p.device)).clone()
    return out


def clone_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter (same device and dtype)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def hand_mask_grads(model: nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """Zero the frozen elements of every ``.grad`` (call after ``backward()``, before clipping and the step)."""
    for name, p in model.named_parameters():
        if name in dense and p.grad is not None:
            p.grad.masked_fill_(dense[name].to(p.grad.device), 0)


@torch.no_grad()
def hand_restore(model: nn.Module, dense: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> None:
    """Write ``base`` back into the frozen elements (call right after ``optimizer.step()``)."""
    for name, p in model.named_parameters():
        if name in dense:
            m = dense[name].to(p.device)
            p.copy_(torch.where(m, base[name].to(device=p.device, dtype=p.dtype), p))
