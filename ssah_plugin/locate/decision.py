"""Decision units: units whose activations separate harmful from benign prompts where the refusal is decided.

The refusal decision is taken at the **end of the prompt**: the last token of the chat-formatted prompt with the
generation prompt (``add_generation_prompt=True``), i.e. the position whose output predicts the first reply token.
For every unit channel ``j`` (input channel ``j`` of an output projection ``B``: ``down_proj`` / ``o_proj`` /
GPT-2 ``c_proj``, the same channels :mod:`ssah_plugin.locate.scores` scores) we take the activation ``x_j`` there, one
value per prompt, over ``n_H`` distinct harmful prompts (the safety data's prompts) and ``n_B`` distinct benign
prompts (the utility data's prompts), and score the standardised mean difference (Cohen's d with pooled std)

    d_j = |mean_H(x_j) - mean_B(x_j)| / s_j,
    s_j^2 = (sum_H (x_j - mean_H)^2 + sum_B (x_j - mean_B)^2) / (n_H + n_B - 2)

weighted like locate's fluctuation score (``Var(x_j) * ||W_B[:, j]||^2``, i.e. in the units of what the channel
writes into the residual stream): ``decision_j = d_j * ||W_B[:, j]||_2`` (``decision_weight="norm"``, default;
``"none"`` keeps ``d_j``). A channel with ``s_j = 0`` scores 0. A head unit scores the sum of its channels (as in
locate). Scores are stored raw (``decision``) and standardised with ``LocateConfig.standardize``
(``decision_z``, the ranking of the ``decision:F`` policies, :mod:`ssah_plugin.core.selections`).

Statistics are forward-only: the forward pre-hooks of :class:`ssah_plugin.locate.stats.StatsCollector` count
exactly one position per prompt (its last), so the per-channel means and M2 are those of the prompt-end
activations (per-batch moments in float32, merged in float64, as for the fluctuation score). Duplicate prompts
are counted once (``safety_refusals.jsonl`` repeats prompts with several refusals).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import torch
from torch import nn

from ssah_plugin.core.mask import Mask
from ssah_plugin.core.selections import DECISION, DECISION_Z, store_selection
from ssah_plugin.core.units import UnitGroup, unwrap_model
from ssah_plugin.data.chat import chat_prompt
from ssah_plugin.data.rows import EncodedPair, fit_pair, warn_truncated
from ssah_plugin.errors import DataError
from ssah_plugin.io.models import max_positions, pad_id_of
from ssah_plugin.locate.config import LocateConfig
from ssah_plugin.locate.inputs import length_limit
from ssah_plugin.locate.scores import column_norms2, layout_of, standardize, unit_scores
from ssah_plugin.locate.stats import collect_stats

__all__ = ["prompt_end_examples", "decision_channel_scores", "decision_scores", "add_decision_units"]

logger = logging.getLogger(__name__)


def _key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, default=str)


def distinct_prompts(prompts: Sequence[Any]) -> list[Any]:
    """The prompts in first-appearance order, each once."""
    seen: set[str] = set()
    out = []
    for p in prompts:
        k = _key(p)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def prompt_end_examples(tokenizer, prompts: Sequence[Any], *, max_length: int | None = None,
                        max_positions: int | None = None, where: str = "prompts") -> list[EncodedPair]:
    """Chat-formatted prompts (``add_generation_prompt=True``, no special tokens added, as
    :func:`ssah_plugin.evaluation.generation.generate` feeds them) with only the last position counted.

    A prompt longer than ``max_length`` keeps its end (the generation prompt: :func:`ssah_plugin.data.rows.fit_pair`
    with no response; one warning per call); without ``max_length`` one longer than ``max_positions`` raises
    :class:`DataError`.
    """
    out = []
    n_cut = 0
    for i, p in enumerate(prompts):
        ids = list(tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"])
        if max_length is not None and len(ids) > max_length:
            ids, _, _ = fit_pair(ids, [], max_length)
            n_cut += 1
        elif max_positions is not None and len(ids) > max_positions:
            raise DataError(f"{where}: prompt {i} is {len(ids)} tokens long after the chat template, more than the "
                            f"model's {max_positions} positions; pass --max-length {max_positions} to truncate")
        if not ids:
            raise DataError(f"{where}: prompt {i} is empty after the chat template")
        out.append(EncodedPair(ids, [False] * (len(ids) - 1) + [True]))
    if max_length is not None:
        warn_truncated(n_cut, len(out), max_length, where)
    return out


def decision_channel_scores(mean_h: torch.Tensor, m2_h: torch.Tensor, n_h: int, mean_b: torch.Tensor,
                            m2_b: torch.Tensor, n_b: int, weight: torch.Tensor | None = None,
                            layout: str = "linear") -> torch.Tensor:
    """``|mean_H - mean_B| / s_pooled`` per channel (float64, CPU), times ``||W[:, j]||`` if ``weight`` is given.

    ``m2`` are sums of squared deviations from the group mean; ``s_pooled^2 = (m2_H + m2_B) / (n_H + n_B - 2)``.
    """
    if n_h + n_b < 3:
        raise DataError(f"decision units need at least 3 prompts in all (got {n_h} harmful, {n_b} benign)")
    diff = (mean_h.double().cpu() - mean_b.double().cpu()).abs()
    pooled = ((m2_h.double().cpu() + m2_b.double().cpu()) / (n_h + n_b - 2)).sqrt()
    d = torch.where(pooled > 0, diff / torch.where(pooled > 0, pooled, torch.ones_like(pooled)),
                    torch.zeros_like(diff))
    if weight is not None:
        d = d * column_norms2(weight, layout).sqrt()
    return d


def decision_scores(model: nn.Module, tokenizer, groups: Sequence[UnitGroup], harmful: Sequence[Any],
                    benign: Sequence[Any], cfg: LocateConfig) -> tuple[list[torch.Tensor], dict]:
    """Raw per-unit decision scores (one tensor per group) and counts for the mask's method.

    ``harmful`` / ``benign`` are prompts (strings or message lists); duplicates are dropped. Runs two forward
    passes over the prompts (no LM head, no backward).
    """
    root = unwrap_model(model)
    h, b = distinct_prompts(harmful), distinct_prompts(benign)
    if len(h) < 2 or len(b) < 2:
        raise DataError(f"decision units need at least 2 distinct harmful and 2 distinct benign prompts (got "
                        f"{len(h)} and {len(b)}); give more safety / utility rows (--max-samples)")
    pad, limit = pad_id_of(tokenizer), length_limit(cfg.max_length, max_positions(root))
    stats = {}
    for what, prompts in (("harmful", h), ("benign", b)):
        enc = prompt_end_examples(tokenizer, prompts, max_length=limit, where=f"decision units, {what} prompts")
        stats[what] = collect_stats(root, groups, enc, batch_size=cfg.batch_size, pad_id=pad,
                                    desc=f"decision {what}", progress=cfg.progress).stats
    per_module = {}
    for name in stats["harmful"]:
        sh, sb = stats["harmful"][name], stats["benign"][name]
        w = root.get_submodule(name).weight if cfg.decision_weight == "norm" else None
        per_module[name] = decision_channel_scores(sh.mean, sh.m2, sh.n, sb.mean, sb.m2, sb.n, w,
                                                   layout_of(groups, name))
    raw = [unit_scores(g, per_module[g.score_module]) for g in groups]
    info = {"n_harmful_prompts": len(h), "n_benign_prompts": len(b)}
    return raw, info


def add_decision_units(model: nn.Module, tokenizer, mask: Mask, harmful: Sequence[Any], benign: Sequence[Any],
                       cfg: LocateConfig) -> Mask:
    """Score decision units on ``model`` and add them to ``mask`` in place (scores ``decision``/``decision_z``,
    stored set ``decision`` = top ``cfg.decision_fraction``, ``method["selections"]["decision"]``)."""
    raw, info = decision_scores(model, tokenizer, mask.groups, harmful, benign, cfg)
    z = standardize(raw, cfg.standardize)
    method = dict(info, position="last prompt token (chat template, add_generation_prompt=True)",
                  score=("|mean_H - mean_B| / s_pooled" + (" * ||W[:, j]||_2" if cfg.decision_weight == "norm" else "")
                         + "; s_pooled^2 = (M2_H + M2_B) / (n_H + n_B - 2); head = sum of its channels"),
                  harmful="safety data prompts (distinct)", benign="utility data prompts (distinct)",
                  weight=cfg.decision_weight, standardize=cfg.standardize)
    store_selection(mask, "decision", {DECISION: raw, DECISION_Z: z}, DECISION_Z, 1.0, cfg.decision_fraction, method)
    logger.info("decision units: %d harmful / %d benign prompts; stored the top %.2f%% (%d units)",
                info["n_harmful_prompts"], info["n_benign_prompts"], 100 * cfg.decision_fraction,
                mask.method["selections"]["decision"]["stored_units"])
    return mask
