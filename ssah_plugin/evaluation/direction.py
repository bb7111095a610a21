"""Refusal-direction diagnostic: does a tuned model still *detect* harm, even where it no longer refuses?

On the base model, the refusal direction of layer ``l`` is the difference of mean residual activations between
harmful and benign prompts at the last prompt token (the position that produces the first reply token), as in
Arditi et al. (2024, "Refusal in language models is mediated by a single direction"). The residual stream of layer
``l`` is the input of decoder layer ``l`` (``output_hidden_states[l]``, ``l = 0 .. L-1``; entry 0 is the token
embeddings; the final, normalised state is not used).

For a tuned model, :func:`direction_kept` projects its activations on the base's unit direction and reports, per
layer, how much of the harmful-minus-benign projection gap is kept (``kept = 1`` for the base itself). Read it next
to the refusal log-odds (:func:`ssah_plugin.evaluation.depth.refusal_log_odds`): a high ``kept`` with falling
log-odds means "still detects harm but no longer acts on it"; a low ``kept`` means "no longer detects harm".
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ssah_plugin.data.chat import Prompt, prompt_ids
from ssah_plugin.errors import DataError
from ssah_plugin.evaluation.depth import forward_batches
from ssah_plugin.io.models import pad_id_of

__all__ = ["last_token_states", "refusal_direction", "direction_kept"]

logger = logging.getLogger(__name__)


def last_token_states(model, tokenizer, prompts: Sequence[Prompt], *, system: str | None = None,
                      batch_size: int = 8, progress: bool = True, desc: str = "activations") -> torch.Tensor:
    """Residual activations at the last prompt token (chat template applied): ``[n, L, d]`` float32 on the CPU."""
    prompts = list(prompts)
    if not prompts:
        raise DataError("the refusal direction needs at least one prompt of each kind")
    seqs = [prompt_ids(tokenizer, p, system) for p in prompts]
    rows: list[torch.Tensor | None] = [None] * len(seqs)

    def keep(i: int, _logits, hs) -> None:
        rows[i] = torch.stack([h[-1] for h in hs[:-1]]).cpu()  # drop the final (normalised) state

    forward_batches(model, seqs, keep, batch_size=batch_size, hidden=True, progress=progress, desc=desc,
                    pad_id=pad_id_of(tokenizer))
    return torch.stack(rows)


def _projections(states: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    return (states.double() * unit.double()).sum(-1)  # [n, L]


def refusal_direction(
    model,
    tokenizer,
    harmful: Sequence[Prompt],
    benign: Sequence[Prompt],
    *,
    system: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """The per-layer refusal direction of ``model`` (call it on the base model).

    Returns ``{"n_harmful", "n_benign", "layers", "direction" ([L, d] mean difference), "unit" (normalised; zero
    where the difference is zero), "norm", "harmful_proj", "benign_proj" (mean projections on ``unit``), "gap"
    (their difference, equal to ``norm``), "separation" (gap / pooled std of the projections), "best_layer" (the
    layer of largest separation, embeddings excluded)}``; lists are per layer.
    """
    h = last_token_states(model, tokenizer, harmful, system=system, batch_size=batch_size, progress=progress,
                          desc="activations (harmful)")
    b = last_token_states(model, tokenizer, benign, system=system, batch_size=batch_size, progress=progress,
                          desc="activations (benign)")
    diff = h.double().mean(0) - b.double().mean(0)
    norm = diff.norm(dim=-1)
    unit = torch.where(norm[:, None] > 0, diff / norm.clamp_min(1e-300)[:, None], torch.zeros_like(diff))
    ph, pb = _projections(h, unit), _projections(b, unit)
    gap = ph.mean(0) - pb.mean(0)
    nh, nb = ph.shape[0], pb.shape[0]
    var_h = ph.var(0, unbiased=True) if nh > 1 else torch.zeros_like(gap)
    var_b = pb.var(0, unbiased=True) if nb > 1 else torch.zeros_like(gap)
    dof = max(nh + nb - 2, 1)
    sd = (((nh - 1) * var_h + (nb - 1) * var_b) / dof).sqrt()
    sep = torch.where(sd > 0, gap / sd.clamp_min(1e-300), torch.zeros_like(gap))
    best = int(torch.argmax(sep[1:])) + 1 if sep.numel() > 1 else 0
    logger.info("refusal direction: %d layers, best layer %d (separation %.2f)", len(norm), best, float(sep[best]))
    return {"n_harmful": nh, "n_benign": nb, "layers": int(diff.shape[0]), "direction": diff.float(),
            "unit": unit.float(), "norm": norm.tolist(), "harmful_proj": ph.mean(0).tolist(),
            "benign_proj": pb.mean(0).tolist(), "gap": gap.tolist(), "separation": sep.tolist(), "best_layer": best}


def direction_kept(
    model,
    tokenizer,
    base_direction: dict,
    harmful: Sequence[Prompt],
    benign: Sequence[Prompt],
    *,
    system: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """How much of the base's harmful-vs-benign projection gap ``model`` keeps, per layer.

    ``kept[l] = (mean proj. of harmful - mean proj. of benign, for model) / (the same for the base)`` on the base's
    unit direction of layer ``l`` (NaN where the base gap is 0). ``cosine[l]`` compares the model's own mean
    difference with the base direction. ``kept_best`` is ``kept`` at the base's ``best_layer``.
    """
    unit = base_direction["unit"]
    h = last_token_states(model, tokenizer, harmful, system=system, batch_size=batch_size, progress=progress,
                          desc="activations (harmful)")
    b = last_token_states(model, tokenizer, benign, system=system, batch_size=batch_size, progress=progress,
                          desc="activations (benign)")
    if tuple(h.shape[1:]) != tuple(unit.shape):
        raise DataError(f"this model's activations have shape {tuple(h.shape[1:])} (layers, width) but the base "
                        f"direction has {tuple(unit.shape)}: compare checkpoints of the same architecture")
    ph, pb = _projections(h, unit), _projections(b, unit)
    gap = ph.mean(0) - pb.mean(0)
    base_gap = torch.tensor(base_direction["gap"], dtype=torch.float64)
    kept = torch.where(base_gap != 0, gap / torch.where(base_gap != 0, base_gap, torch.ones_like(base_gap)),
                       torch.full_like(gap, float("nan")))
    own = h.double().mean(0) - b.double().mean(0)
    own_norm = own.norm(dim=-1)
    unit_d = unit.double()
    cos = torch.where((own_norm > 0) & (unit_d.norm(dim=-1) > 0), (own * unit_d).sum(-1) / own_norm.clamp_min(1e-300),
                      torch.full_like(own_norm, float("nan")))
    best = base_direction["best_layer"]
    logger.info("refusal direction kept at layer %d: %.3f", best, float(kept[best]))
    return {"n_harmful": ph.shape[0], "n_benign": pb.shape[0], "best_layer": best, "kept": kept.tolist(),
            "kept_best": float(kept[best]), "gap": gap.tolist(), "harmful_proj": ph.mean(0).tolist(),
            "benign_proj": pb.mean(0).tolist(), "cosine": cos.tolist()}
