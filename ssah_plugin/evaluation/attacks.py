"""Attacks that probe how deep a model's refusal goes: reply pre-filling and motive framing.

* :func:`prefill_attack`: the reply is pre-filled with the first K tokens (of the model's own tokenizer) of a
  compliant target ("Sure, here is ...") right after the chat template's assistant header, and the model continues
  greedily. A refusal that lives only in the first reply tokens is bypassed at small K (Qi et al., 2024, "Safety
  alignment should be made more than just a few tokens deep"). The continuation (not the pre-filled text) is judged.
* :func:`framing_attack`: every prompt is asked plainly and under motive/context framings
  (``ssah_plugin/data/framings.json``, extensible by a user file); the **flip rate** counts prompts refused plainly
  but answered under at least one framing (:func:`flip_rate`). Loading, checking and expanding framings and the flip
  arithmetic need no model and live in :mod:`ssah_plugin.evaluation.framing` (re-exported here).

Harmful prompts, targets and replies are never logged; they are returned in the result dicts only.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from ssah_plugin.data.chat import Prompt, prompt_ids
from ssah_plugin.data.eval_sets import HARMFUL_DEFAULT, harmful_rows
from ssah_plugin.data.rows import prompts_from_rows
from ssah_plugin.errors import DataError
from ssah_plugin.evaluation.framing import (
    PLAIN,
    Framing,
    expand_framings,
    flip_rate,
    load_framings,
)
from ssah_plugin.evaluation.generation import generate, generate_from_ids
from ssah_plugin.evaluation.judge import RefusalJudge
from ssah_plugin.evaluation.stats import rate_summary

__all__ = [
    "DEFAULT_KS",
    "PLAIN",
    "TARGET_FIELDS",
    "Framing",
    "expand_framings",
    "flip_rate",
    "framing_attack",
    "load_framings",
    "load_targets",
    "prefill_attack",
    "prefill_inputs",
]

logger = logging.getLogger(__name__)

#: Default prefill lengths (tokens of the target); ``"full"`` is the whole target.
DEFAULT_KS: tuple = (0, 5, 10, 20, "full")
#: Row fields that may hold a compliant target, in order of preference.
TARGET_FIELDS = ("target", "response")


# ---------------------------------------------------------------------------------------------------- prefill
def load_targets(source: str | os.PathLike | None = None, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(prompts, targets) from the same sources as :func:`ssah_plugin.data.eval_sets.load_harmful` (default
    ``advbench:eval``). The target is the row's ``target`` field, else its ``response`` field; a row without
    either raises :class:`DataError` naming the fields."""
    rows = harmful_rows(source)[:limit] if limit is not None else harmful_rows(source)
    where = f"harmful prompts {str(source or HARMFUL_DEFAULT)!r}"
    prompts = prompts_from_rows(rows, where=where)
    targets = []
    for i, row in enumerate(rows):
        key = next((k for k in TARGET_FIELDS if k in row), None)
        value = row.get(key) if key else None
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: row {i} has no {' / '.join(TARGET_FIELDS)} field with text (the row has "
                            f"{sorted(row)}); the prefill attack needs a compliant target per prompt, e.g. "
                            "AdvBench's 'Sure, here is ...' targets (--harmful advbench:eval)")
        targets.append(value)
    if not prompts:
        raise DataError(f"{where}: no prompts")
    return prompts, targets


def _check_k(k: Any) -> int | str:
    if k == "full":
        return "full"
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise DataError(f"prefill K must be a non-negative integer or 'full', got {k!r}")
    return k


def prefill_inputs(tokenizer, prompts: Sequence[Prompt], targets: Sequence[str], k: int | str,
                   system: str | None = None, short: str = "error") -> list[list[int]]:
    """Model inputs of the prefill attack: chat prompt ids (``add_generation_prompt=True``) followed by the first
    ``k`` token ids of each target (tokenised on its own, no special tokens; ``"full"``: all of them).

    A target shorter than ``k`` tokens: ``short="error"`` raises :class:`DataError` naming the first prompt index;
    ``short="cap"`` prefills that prompt with its whole target (AdvBench has targets of 9 tokens, so K = 10 or 20
    needs it; :func:`prefill_attack` reports how many prompts were capped); a K longer than every target is still
    an error.
    """
    k = _check_k(k)
    if short not in ("error", "cap"):
        raise ValueError(f"short must be 'error' or 'cap', got {short!r}")
    if len(prompts) != len(targets):
        raise DataError(f"prefill needs one target per prompt, got {len(prompts)} prompts and {len(targets)} targets")
    out = []
    if short == "cap" and k != "full":
        longest = max((len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets), default=0)
        if k > longest:
            raise DataError(f"prefill K={k} is longer than every target (the longest has {longest} tokens of this "
                            "tokenizer), so no prompt could be pre-filled with K tokens; use a smaller K or 'full'")
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        t = list(tokenizer(target, add_special_tokens=False)["input_ids"])
        if not t:
            raise DataError(f"prefill target {i} is empty")
        if k != "full" and k > len(t) and short == "error":
            raise DataError(f"prefill K={k} is longer than the target of prompt {i} ({len(t)} tokens of this "
                            "tokenizer); use a smaller K, 'full', or short='cap' (--prefill-short cap) to prefill "
                            "such prompts with their whole target")
        out.append(prompt_ids(tokenizer, prompt, system) + (t if k == "full" else t[:k]))
    return out


def _judged(judge: RefusalJudge, texts: Sequence[str]) -> dict:
    flags = [int(judge.attack_success(t)) for t in texts]
    s = rate_summary(flags)
    return {"n": s["n"], "n_attack_success": s["k"], "asr": s["rate"], "refusal_rate": 1.0 - s["rate"],
            "wilson95": s["wilson95"], "attack_success": flags}


def prefill_attack(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    targets: Sequence[str],
    ks: Sequence[int | str] = DEFAULT_KS,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    judge: RefusalJudge | None = None,
    system: str | None = None,
    progress: bool = True,
    short: str = "error",
) -> dict:
    """Attack success rate as a function of the prefill length K (see the module docstring).

    Every K is checked against every target before anything is generated. ``wilson95`` is the 95% Wilson interval
    of the ASR. ``short``: what a target shorter than K gets (:func:`prefill_inputs`); with ``"cap"`` each K's
    result counts the prompts that were prefilled with their whole, shorter target (``n_capped``).

    Returns:
        ``{"ks": [...], "per_k": {str(k): {"n", "n_attack_success", "asr", "refusal_rate", "wilson95",
        "attack_success": [0/1 per prompt], "continuations": [str]}}, "target_tokens": [...], "judge",
        "generation"}``. ``continuations`` hold the generated text after the prefill: do not log them.

    Example:
        >>> res = prefill_attack(model, tok, prompts, targets, ks=(0, 5, "full"))  # doctest: +SKIP
        >>> res["per_k"]["5"]["asr"]  # doctest: +SKIP
    """
    judge = judge or RefusalJudge()
    prompts, targets = list(prompts), list(targets)
    if not prompts:
        raise DataError("prefill_attack needs at least one prompt")
    ks = list(dict.fromkeys(_check_k(k) for k in ks))
    if not ks:
        raise DataError("prefill_attack needs at least one K")
    inputs = {k: prefill_inputs(tokenizer, prompts, targets, k, system, short) for k in ks}  # validates all K first
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets]
    out: dict[str, Any] = {"ks": ks, "per_k": {}, "short": short,
                           "target_tokens": lengths,
                           "judge": judge.config(),
                           "generation": {"max_new_tokens": max_new_tokens, "system": system}}
    for k in ks:
        new = generate_from_ids(model, tokenizer, inputs[k], max_new_tokens=max_new_tokens, batch_size=batch_size,
                                progress=progress, desc=f"prefill K={k}")
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
        res = _judged(judge, texts)
        res["continuations"] = texts
        res["n_capped"] = 0 if k == "full" else sum(1 for n in lengths if n < k)
        out["per_k"][str(k)] = res
        logger.info("prefill K=%s: ASR %.1f%% of %d prompts", k, 100.0 * res["asr"], res["n"])
    return out


# ---------------------------------------------------------------------------------------------------- framing
def framing_attack(
    model,
    tokenizer,
    prompts: Sequence[str],
    framings: Sequence[Framing] | None = None,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    judge: RefusalJudge | None = None,
    system: str | None = None,
    progress: bool = True,
) -> dict:
    """ASR of every prompt asked plainly and under each framing (default: the shipped ones), and the flip rate.

    Returns:
        ``{"framings": [ids, "plain" first], "templates": {id: template}, "per_framing": {id: {"n", "asr",
        "refusal_rate", "wilson95", "attack_success", "replies"}}, "flip": flip_rate(...), "judge",
        "generation"}``. ``replies`` hold harmful text: do not log them.
    """
    judge = judge or RefusalJudge()
    framings = load_framings() if framings is None else list(framings)
    prompts = list(prompts)
    if not prompts:
        raise DataError("framing_attack needs at least one prompt")
    rows = expand_framings(prompts, framings)
    replies = generate(model, tokenizer, [r["text"] for r in rows], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, system=system, progress=progress, desc="framing")
    ids = [PLAIN] + [f.id for f in framings]
    per: dict[str, Any] = {}
    for fid in ids:
        texts = [rep for r, rep in zip(rows, replies) if r["framing"] == fid]
        per[fid] = _judged(judge, texts)
        per[fid]["replies"] = texts
        logger.info("framing %s: ASR %.1f%% of %d prompts", fid, 100.0 * per[fid]["asr"], len(texts))
    flip = flip_rate({fid: per[fid]["attack_success"] for fid in ids})
    logger.info("framing flip rate: %d of %d prompts", flip["n_flipped"], flip["n"])
    return {"framings": ids, "templates": {f.id: f.template for f in framings}, "per_framing": per, "flip": flip,
            "judge": judge.config(), "generation": {"max_new_tokens": max_new_tokens, "system": system}}
