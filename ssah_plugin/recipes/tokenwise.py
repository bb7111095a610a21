"""The token-wise constrained objective of Qi et al. 2024 (Eq. 3) as pure tensor functions (no trainer, no hooks).

"Safety Alignment Should Be Made More Than Just a Few Tokens Deep" (Qi et al., ICLR 2025) replaces the fine-tuning
cross-entropy by, for every response token ``t`` (``Delta_t = log pi_theta(y_t|x,y<t) - log pi_aligned(y_t|x,y<t)``)::

    loss_t = (2 / beta_t) * softplus(-beta_t * Delta_t)  =  -(2 / beta_t) * log sigmoid(beta_t * Delta_t)

:class:`ssah_plugin.recipes.constrained.TokenwiseConstraint` runs these inside a transformers Trainer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "PAPER_BETAS", "PAPER_BETA_REST", "response_positions", "beta_schedule",
           "tokenwise_loss", "target_logps"]

#: Label value of prompt and padding positions (transformers' cross-entropy ``ignore_index``).
IGNORE_INDEX = -100
#: Qi et al. 2024, Table 3 / Eq. 3: beta on response tokens 1..5 (then :data:`PAPER_BETA_REST`).
PAPER_BETAS: tuple[float, ...] = (0.5, 2.0, 2.0, 2.0, 2.0)
PAPER_BETA_REST: float = 0.1


def response_positions(targets: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Index of each target token among the response tokens of its sequence; ``-1`` where ignored.

    ``targets`` are the already shifted labels (``targets[:, i]`` is the token predicted from position ``i``);
    ``IGNORE_INDEX`` marks prompt and padding. A row is one sequence, unless ``position_ids`` (aligned with
    ``targets``, i.e. taken at the target's own position) restart at 0 inside it: then each restart begins a new
    sequence (padding-free packing), and counting restarts too.
    """
    valid = targets.ne(IGNORE_INDEX)
    counts = valid.long().cumsum(dim=-1) - valid.long()  # valid targets strictly before each position
    if position_ids is not None:
        start = position_ids.eq(0)
        start[..., 0] = True
        base = torch.where(start, counts, torch.zeros_like(counts)).cummax(dim=-1).values
        counts = counts - base
    return torch.where(valid, counts, torch.full_like(counts, -1))


def beta_schedule(positions: torch.Tensor, betas: Sequence[float] = PAPER_BETAS,
                  beta_rest: float = PAPER_BETA_REST) -> torch.Tensor:
    """``beta_t`` for each response position (``positions >= 0``): ``betas[t]`` for ``t < len(betas)``, else
    ``beta_rest``. Returned in float64 on ``positions.device``; ignored positions get ``beta_rest``."""
    table = torch.tensor(list(betas) + [beta_rest], dtype=torch.float64, device=positions.device)
    idx = positions.clamp(min=0, max=len(betas))
    return table[idx]


def tokenwise_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Eq. 3 per token: ``(2/beta) * softplus(-beta * (policy_logps - reference_logps))`` (same shape, float32+)."""
    b = betas.to(policy_logps.dtype)
    delta = policy_logps - reference_logps.detach()
    return (2.0 / b) * F.softplus(-b * delta)


def target_logps(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` at the kept positions only (never the full ``[B, T, V]`` in float32)."""
    picked = logits[keep].float()
    return picked.log_softmax(dim=-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
