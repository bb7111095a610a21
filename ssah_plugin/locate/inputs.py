"""Calibration data for locate: load, sample and tokenise the safety and utility sets.

Safety data is harmful prompts with refusals (a file, ``shipped:NAME``, a hub name, row dicts or ``(prompt,
response)`` tuples), or, with ``LocateConfig.own_refusals``, harmful prompts whose refusals the model itself
writes (:func:`ssah_plugin.evaluation.refusals.own_refusals`). Utility data is benign ``(prompt, response)`` pairs.
Rows are drawn with a seeded RNG; conversations are formatted with the chat template and the counted positions
chosen by :func:`ssah_plugin.data.rows.encode_pairs`; a conversation longer than ``max_length`` (default and
upper bound: the model's maximum positions) is cut by the one truncation rule,
:func:`ssah_plugin.data.rows.fit_pair`, with one warning per data set. Runs before any hook; the model is used
only to generate its own refusals.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ssah_plugin.data.rows import (
    EncodedPair,
    Pair,
    encode_pairs,
    load_rows,
    pairs_from_rows,
    prompts_from_rows,
    sample_rows,
)
from ssah_plugin.errors import DataError
from ssah_plugin.evaluation.refusals import own_refusals
from ssah_plugin.locate.config import LocateConfig

__all__ = ["as_pairs", "safety_pairs", "prepare_data", "length_limit", "source_name", "CalibrationData"]

logger = logging.getLogger(__name__)


def as_pairs(source, *, what: str, prompt_field, response_field, input_field, max_samples, seed) -> list[Pair]:
    """``(prompt, response)`` pairs from ``source``: tuples are taken as they are (the first ``max_samples``), any
    other source is loaded and ``max_samples`` rows are drawn with ``seed``."""
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], tuple):
        return list(source) if max_samples is None else list(source)[:max_samples]
    rows = sample_rows(load_rows(source), max_samples, seed)
    return pairs_from_rows(rows, prompt_field=prompt_field, response_field=response_field, input_field=input_field,
                           where=f"{what} data")


def safety_pairs(model, tokenizer, source, cfg: LocateConfig, max_samples: int | None) -> list[Pair]:
    """The safety pairs: rows of ``source``, or the model's own refusals to its prompts (``cfg.own_refusals``;
    one reply per distinct prompt, AdvBench ``eval`` rows never used)."""
    if not cfg.own_refusals:
        return as_pairs(source, what="safety", prompt_field=cfg.safety_prompt_field,
                        response_field=cfg.safety_response_field, input_field=None, max_samples=max_samples,
                        seed=cfg.seed)
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], str):
        prompts = list(source)[:max_samples] if max_samples else list(source)
    else:
        rows = load_rows(source)
        if any(r.get("split") == "eval" for r in rows):  # AdvBench: never calibrate on the evaluation prompts
            rows = [r for r in rows if r.get("split") != "eval"]
            logger.info("own refusals: skipping AdvBench rows with split 'eval' (%d rows left)", len(rows))
            if not rows:
                raise DataError("the safety data holds only AdvBench 'eval' rows, which are kept for evaluation; "
                                "use the 'calib' rows")
        # one row per distinct prompt (safety_refusals.jsonl repeats prompts)
        seen, uniq = set(), []
        for r in rows:
            key = r.get(cfg.safety_prompt_field or "prompt", id(r))
            if key not in seen:
                seen.add(key)
                uniq.append(r)
        prompts = prompts_from_rows(sample_rows(uniq, max_samples, cfg.seed), prompt_field=cfg.safety_prompt_field,
                                    where="safety data")
    return own_refusals(model, tokenizer, prompts, max_new_tokens=cfg.refusal_max_new_tokens,
                        batch_size=cfg.batch_size, progress=cfg.progress)


@dataclass
class CalibrationData:
    """What :func:`prepare_data` returns: the encoded sets, the pairs behind them and the held-apart rows."""

    safety: list[EncodedPair]
    utility: list[EncodedPair]
    info: dict  # counts and sources: recorded as ``mask.method["data"]``
    pairs: dict[str, list[Pair]]  # {"safety": ..., "utility": ...}: the calibration pairs (decision / conflict units)
    held: dict[str, list[Pair]] = field(default_factory=dict)  # held apart for auto mode (empty otherwise)


def length_limit(max_length: int | None, max_pos: int | None) -> int | None:
    """The longest conversation locate feeds the model: ``max_length`` lowered to the model's maximum positions
    (as the benign loss does), or those positions when ``max_length`` is None. Longer rows are cut by the one rule,
    :func:`ssah_plugin.data.rows.fit_pair` (prompt end and response start kept; one warning per data set)."""
    if max_length is None or max_pos is None:
        return max_pos if max_length is None else max_length
    return min(max_length, max_pos)


def prepare_data(model, tokenizer, safety, utility, cfg: LocateConfig, max_pos: int | None) -> CalibrationData:
    """Load, sample and tokenise both data sets (``cfg.auto``: the last ``cfg.auto_holdout`` rows of each are held
    apart, not encoded)."""
    extra = cfg.auto_holdout if cfg.auto else 0
    n = None if cfg.max_samples is None else cfg.max_samples + extra
    s_pairs = safety_pairs(model, tokenizer, safety, cfg, n)
    u_pairs = as_pairs(utility, what="utility", prompt_field=cfg.utility_prompt_field,
                       response_field=cfg.utility_response_field, input_field=cfg.utility_input_field,
                       max_samples=n, seed=cfg.seed)
    held: dict = {}
    if cfg.auto:
        for name, pairs in (("safety", s_pairs), ("utility", u_pairs)):
            if len(pairs) < cfg.auto_holdout + 1:
                raise DataError(f"auto mode holds {cfg.auto_holdout} {name} rows apart but the data has only "
                                f"{len(pairs)}; give more rows or lower auto_holdout")
        held = {"safety": s_pairs[-cfg.auto_holdout:], "utility": u_pairs[-cfg.auto_holdout:]}
        s_pairs, u_pairs = s_pairs[:-cfg.auto_holdout], u_pairs[:-cfg.auto_holdout]
    limit = length_limit(cfg.max_length, max_pos)
    enc_s = encode_pairs(tokenizer, s_pairs, tokens=cfg.tokens, max_length=limit, where="safety data")
    enc_u = encode_pairs(tokenizer, u_pairs, tokens=cfg.tokens, max_length=limit, where="utility data")
    info = {"n_safety": len(enc_s), "n_utility": len(enc_u),
            "safety_tokens_counted": sum(sum(e.count) for e in enc_s),
            "utility_tokens_counted": sum(sum(e.count) for e in enc_u),
            "safety_source": source_name(safety), "utility_source": source_name(utility)}
    return CalibrationData(enc_s, enc_u, info, {"safety": s_pairs, "utility": u_pairs}, held)


def source_name(source) -> str:
    """How ``method`` names a data source."""
    return f"<{len(source)} in-memory rows>" if isinstance(source, (list, tuple)) else str(source)
