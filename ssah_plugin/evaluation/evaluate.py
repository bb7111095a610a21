"""Safety and utility evaluation of one or several checkpoints (the "Evidence" numbers).

:func:`evaluate_checkpoint` runs the attack success rate and the benign loss
(:mod:`ssah_plugin.evaluation.metrics`) on one model; :func:`compare` on several, loading one model at a time.
Default data (:mod:`ssah_plugin.data.eval_sets`): the AdvBench ``eval`` split (ids 0-99, Wei et al.'s) and the
held-out benign rows (``benign:heldout``, rows ``9 (mod 10)`` of the shipped ``benign_instructions.jsonl``).
:mod:`ssah_plugin.evaluation.report` renders the results (markdown, JSON, PNG).

Harmful prompts and replies are never logged: logs carry counts and rates only. Replies are returned in the result
dict (``details``) so that a caller can save them deliberately.
"""
from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ssah_plugin.data.chat import Prompt
from ssah_plugin.data.eval_sets import load_benign, load_harmful
from ssah_plugin.errors import SSAHError
from ssah_plugin.evaluation.judge import RefusalJudge
from ssah_plugin.evaluation.metrics import attack_success_rate, benign_loss
from ssah_plugin.io.models import DeviceMap, load_model

__all__ = ["compare", "evaluate_checkpoint"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- combined
def evaluate_checkpoint(
    model,
    tokenizer=None,
    *,
    name: str | None = None,
    harmful: Sequence[Prompt] | str | os.PathLike | None = None,
    benign: Sequence | str | os.PathLike | None = None,
    limit: int | None = None,
    benign_limit: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_length: int = 512,
    system: str | None = None,
    judge: RefusalJudge | None = None,
    progress: bool = True,
    safety: bool = True,
    utility: bool = True,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
    device_map: DeviceMap | None = None,
) -> dict:
    """Safety (ASR) and utility (benign loss) of one checkpoint.

    Args:
        model: a loaded model (then pass ``tokenizer``) or a spec for :func:`load_model` (``tiny:llama``, a folder,
            a hub name).
        harmful / benign: prompt lists / pair lists, or sources for :func:`load_harmful` / :func:`load_benign`
            (:mod:`ssah_plugin.data.eval_sets`; default: AdvBench eval split / held-out benign rows).
        limit: evaluate the first ``limit`` harmful prompts only; ``benign_limit`` the same for benign pairs
            (defaults to ``limit``).
        safety / utility: switch either part off.
        dtype / device / device_map: used when ``model`` is a spec to load
            (:func:`ssah_plugin.io.models.load_model`).

    Returns:
        ``{"name", "model", "asr", "refusal_rate", "n_harmful", "benign_loss", "perplexity", "benign_tokens",
        "n_benign", "judge", "generation", "details": {"flags", "matched", "responses", "prompts"}}`` (missing parts
        are ``None``).
    """
    spec = None
    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        model, tokenizer = load_model(spec, dtype=dtype, device=device, device_map=device_map)
    elif tokenizer is None:
        raise SSAHError("evaluate_checkpoint needs the tokenizer when given a model object")
    name = name or spec or type(model).__name__
    benign_limit = limit if benign_limit is None else benign_limit
    out: dict[str, Any] = {"name": name, "model": spec or name, "asr": None, "refusal_rate": None, "n_harmful": 0,
                           "benign_loss": None, "perplexity": None, "benign_tokens": 0, "n_benign": 0,
                           "judge": None, "generation": None, "details": {}}
    if safety:
        prompts = (load_harmful(harmful, limit) if harmful is None or isinstance(harmful, (str, os.PathLike))
                   else list(harmful)[:limit])
        res = attack_success_rate(model, tokenizer, prompts, judge, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, system=system, progress=progress)
        out.update(asr=res["asr"], refusal_rate=res["refusal_rate"], n_harmful=res["n"], judge=res["judge"],
                   generation=res["generation"])
        out["details"] = {"prompts": prompts, "flags": res["flags"], "matched": res["matched"],
                          "responses": res["responses"]}
    if utility:
        pairs = (load_benign(benign, benign_limit) if benign is None or isinstance(benign, (str, os.PathLike))
                 else list(benign)[:benign_limit])
        res = benign_loss(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length, system=system,
                          progress=progress)
        out.update(benign_loss=res["loss"], perplexity=res["perplexity"], benign_tokens=res["tokens"],
                   n_benign=res["n"], benign_truncated=res["truncated"])
    logger.info("%s: ASR %s, benign loss %s", name,
                "n/a" if out["asr"] is None else f"{100 * out['asr']:.1f}%",
                "n/a" if out["benign_loss"] is None else f"{out['benign_loss']:.4f}")
    return out


def compare(checkpoints: Sequence | Mapping, **kwargs: Any) -> list[dict]:
    """:func:`evaluate_checkpoint` on several checkpoints, in order, one model in memory at a time.

    Args:
        checkpoints: specs (``["tiny:llama", "out/ft-plain", "out/ft-frozen"]``), a mapping ``{name: spec}``, or
            ``(name, model, tokenizer)`` triples for models already loaded.
        kwargs: passed to :func:`evaluate_checkpoint` (same data and decoding for every checkpoint).
    """
    items = list(checkpoints.items()) if isinstance(checkpoints, Mapping) else list(checkpoints)
    if not items:
        raise SSAHError("compare needs at least one checkpoint")
    results = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 3:
            name, model, tok = item
            results.append(evaluate_checkpoint(model, tok, name=name, **kwargs))
        elif isinstance(item, tuple) and len(item) == 2:
            name, spec = item
            results.append(evaluate_checkpoint(spec, name=name, **kwargs))
        else:
            results.append(evaluate_checkpoint(item, **kwargs))
        gc.collect()
    return results
