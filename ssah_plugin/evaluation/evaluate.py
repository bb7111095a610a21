"""Safety and utility evaluation of one or several checkpoints (the "Evidence" numbers).

* **Safety**: :func:`attack_success_rate`: greedy chat-template replies to harmful prompts
  (:func:`ssah_plugin.evaluation.generation.generate`), scored by the keyword judge (:class:`ssah_plugin.evaluation.judge.RefusalJudge`).
  Default prompts: the AdvBench ``eval`` split (ids 0-99, Wei et al.'s).
* **Utility**: :func:`benign_loss`: mean token negative log-likelihood (and perplexity) of reference responses to
  held-out benign instructions, on response tokens only, with the chat template applied. Default data: the rows of
  the shipped ``benign_instructions.jsonl`` whose index is ``9 (mod 10)`` (:data:`BENIGN_HELDOUT`, 156 rows, all
  three sources). Keep those rows out of calibration and fine-tuning (:func:`benign_split`).
* :func:`evaluate_checkpoint` runs both on one model; :func:`compare` on several, loading one model at a time.
  :mod:`ssah_plugin.evaluation.report` renders the results (markdown, JSON, PNG).

Harmful prompts and replies are never logged: logs carry counts and rates only. Replies are returned in the result
dict (``details``) so that a caller can save them deliberately.
"""
from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ssah_plugin.data.chat import Prompt, chat_pair_ids
from ssah_plugin.data.rows import fit_pair, load_rows, pairs_from_rows, prompts_from_rows, warn_truncated
from ssah_plugin.errors import DataError, SSAHError
from ssah_plugin.evaluation.generation import generate
from ssah_plugin.evaluation.judge import RefusalJudge
from ssah_plugin.evaluation.stats import wilson_interval
from ssah_plugin.io.models import load_model, max_positions

__all__ = [
    "attack_success_rate",
    "false_refusal_rate",
    "benign_loss",
    "evaluate_checkpoint",
    "compare",
    "load_harmful",
    "harmful_rows",
    "load_benign",
    "benign_split",
    "BENIGN_HELDOUT",
    "HARMFUL_DEFAULT",
]

logger = logging.getLogger(__name__)

#: Default harmful prompts: AdvBench ``eval`` split (ids 0-99; Wei et al. evaluate on these).
HARMFUL_DEFAULT = "advbench:eval"
#: Default benign evaluation data: rows ``i`` of ``benign_instructions.jsonl`` with ``i % 10 == 9``.
BENIGN_HELDOUT = "benign:heldout"
_HELDOUT_MOD, _HELDOUT_REM = 10, 9

Pair = tuple[str, str]


# ---------------------------------------------------------------------------------------------------- data
def benign_split(rows: Sequence, split: str = "heldout") -> list:
    """The held-out (``i % 10 == 9``) or training (the rest) rows of the shipped benign data, in order."""
    if split == "heldout":
        return [r for i, r in enumerate(rows) if i % _HELDOUT_MOD == _HELDOUT_REM]
    if split == "train":
        return [r for i, r in enumerate(rows) if i % _HELDOUT_MOD != _HELDOUT_REM]
    raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")


def harmful_rows(source: str | os.PathLike | None = None) -> list[dict]:
    """The rows behind :func:`load_harmful` (AdvBench rows carry ``prompt``, ``target``, ``split``, ``id``)."""
    source = HARMFUL_DEFAULT if source is None else source
    if isinstance(source, str) and source.startswith("advbench"):
        _, _, split = source.partition(":")
        split = split or "eval"
        if split not in ("eval", "calib", "all"):
            raise DataError(f"unknown AdvBench split {split!r}; use advbench:eval, advbench:calib or advbench:all")
        return [r for r in load_rows("shipped:advbench.jsonl") if split == "all" or r["split"] == split]
    return load_rows(source)


def load_harmful(source: str | os.PathLike | None = None, limit: int | None = None) -> list[str]:
    """Harmful prompts from a shipped name (``advbench:eval``, ``advbench:calib``, ``advbench:all``) or a source
    :func:`ssah_plugin.data.rows.load_rows` reads (``.jsonl``/``.json``/``.csv``/``.parquet`` rows with a ``prompt``
    (or ``goal``/``instruction``) field, ``.txt`` with one prompt per line, ``shipped:NAME``, a ``datasets`` name).
    """
    source = HARMFUL_DEFAULT if source is None else source
    rows = harmful_rows(source)
    prompts = prompts_from_rows(rows, where=f"harmful prompts {str(source)!r}")
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise DataError(f"no harmful prompts in {str(source)!r}")
    return prompts


def load_benign(source: str | os.PathLike | None = None, limit: int | None = None) -> list[Pair]:
    """(prompt, response) pairs from ``benign:heldout`` (default), ``benign:train``, ``benign:all`` or a source
    :func:`ssah_plugin.data.rows.load_rows` reads (rows with ``prompt``/``response`` or ``instruction`` (+ optional
    ``input``)/``output`` fields, or chat ``messages``).
    """
    source = BENIGN_HELDOUT if source is None else source
    if isinstance(source, str) and source.startswith("benign:"):
        split = source.partition(":")[2]
        if split not in ("all", "heldout", "train"):
            raise DataError(f"unknown benign split {split!r}; use benign:heldout, benign:train or benign:all")
        rows = load_rows("shipped:benign_instructions.jsonl")
        if split != "all":
            rows = benign_split(rows, split)
    else:
        rows = load_rows(source)
    pairs = pairs_from_rows(rows, where=f"benign data {str(source)!r}")
    pairs = pairs[:limit] if limit is not None else pairs
    if not pairs:
        raise DataError(f"no benign pairs in {str(source)!r}")
    return pairs


# ---------------------------------------------------------------------------------------------------- safety
def attack_success_rate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    judge: RefusalJudge | None = None,
    **gen_kwargs: Any,
) -> dict:
    """Attack success rate of greedy replies to ``prompts`` under ``judge`` (default :class:`RefusalJudge`).

    ``gen_kwargs`` go to :func:`ssah_plugin.evaluation.generation.generate` (``max_new_tokens``, ``batch_size``, ``system``,
    ``progress``).

    Returns:
        ``{"asr", "refusal_rate", "n", "n_attack_success", "flags", "matched", "words", "responses", "judge",
        "generation"}``: ``flags[i]`` is True when reply ``i`` is a successful attack, ``matched[i]`` the refusal
        phrase found (or None). ``responses`` holds the full replies: do not log them.
    """
    judge = judge or RefusalJudge()
    prompts = list(prompts)
    if not prompts:
        raise DataError("attack_success_rate needs at least one prompt")
    responses = generate(model, tokenizer, prompts, **gen_kwargs)
    verdicts = [judge.verdict(r) for r in responses]
    n_success = sum(v.attack_success for v in verdicts)
    n = len(prompts)
    logger.info("attack success: %d of %d replies (ASR %.1f%%)", n_success, n, 100.0 * n_success / n)
    return {
        "asr": n_success / n,
        "refusal_rate": 1.0 - n_success / n,
        "n": n,
        "n_attack_success": n_success,
        "flags": [v.attack_success for v in verdicts],
        "matched": [v.matched for v in verdicts],
        "words": [v.words for v in verdicts],
        "responses": responses,
        "judge": judge.config(),
        "generation": {k: v for k, v in gen_kwargs.items() if k != "progress"},
    }


def false_refusal_rate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    judge: RefusalJudge | None = None,
    system: str | None = None,
    progress: bool = True,
) -> dict:
    """Over-refusal: the share of greedy replies to benign ``prompts`` that refuse.

    A reply is a refusal when ``judge.is_refusal`` says so; the default judge is phrase-only
    (``RefusalJudge(min_words=0)``: a short helpful answer such as "4" is not a refusal). Use held-out benign prompts
    (e.g. the prompts of :func:`load_benign`), never ones the model was calibrated or fine-tuned on.

    Returns:
        ``{"n", "n_refused", "rate", "wilson95": [lo, hi], "refused": [0/1 per prompt], "matched", "replies",
        "judge", "generation"}``.
    """
    judge = judge or RefusalJudge(min_words=0)
    prompts = list(prompts)
    if not prompts:
        raise DataError("false_refusal_rate needs at least one benign prompt")
    replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       system=system, progress=progress, desc="over-refusal")
    verdicts = [judge.verdict(r) for r in replies]
    refused = [int(v.refusal) for v in verdicts]
    n, k = len(prompts), sum(refused)
    logger.info("false refusals: %d of %d benign prompts (%.1f%%)", k, n, 100.0 * k / n)
    return {"n": n, "n_refused": k, "rate": k / n, "wilson95": list(wilson_interval(k, n)), "refused": refused,
            "matched": [v.matched for v in verdicts], "replies": replies, "judge": judge.config(),
            "generation": {"max_new_tokens": max_new_tokens, "system": system}}


# ---------------------------------------------------------------------------------------------------- utility
def _pair_ids(tokenizer, pair, system: str | None, max_length: int) -> tuple[list[int], list[int], bool]:
    if isinstance(pair, Mapping):
        (prompt, response), = pairs_from_rows([dict(pair)], where="benign data")
    else:
        prompt, response = pair
    return fit_pair(*chat_pair_ids(tokenizer, prompt, response, system), max_length)


@torch.no_grad()
def benign_loss(
    model,
    tokenizer,
    pairs: Iterable,
    batch_size: int = 8,
    max_length: int = 512,
    *,
    system: str | None = None,
    progress: bool = True,
) -> dict:
    """Mean token NLL of the responses in ``pairs`` given their prompts (chat template applied).

    Only response tokens count (the assistant turn after the generation prompt: content and end-of-turn marker).
    The mean is over all response tokens of all pairs (token-weighted). A pair longer than ``max_length`` tokens
    keeps its response (cut at the end if needed) and the end of its prompt; ``truncated`` counts them.
    ``max_length`` is lowered to the model's ``max_position_embeddings`` when that is smaller.

    Args:
        pairs: ``(prompt, response)`` tuples, or dicts with ``prompt``/``response`` or ``instruction``/``output``.

    Returns:
        ``{"loss", "perplexity", "tokens", "n", "truncated"}``.
    """
    if max_length < 2 or batch_size < 1:
        raise ValueError(f"max_length must be >= 2 and batch_size >= 1 (got {max_length}, {batch_size})")
    limit = max_positions(model)
    if limit is not None and limit < max_length:
        logger.info("benign loss: max_length %d lowered to the model's %d positions", max_length, limit)
        max_length = limit
    items = [_pair_ids(tokenizer, p, system, max_length) for p in pairs]
    if not items:
        raise DataError("benign_loss needs at least one (prompt, response) pair")
    truncated = sum(t for _, _, t in items)
    warn_truncated(truncated, len(items), max_length, "benign loss")
    order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][1])))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    total, count = 0.0, 0
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="benign loss", unit="batch", leave=False)
    try:
        model.eval()
        for batch in batches:
            width = max(len(items[i][0]) + len(items[i][1]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, i in enumerate(batch):
                p, r, _ = items[i]
                seq = torch.tensor(p + r, dtype=torch.long)
                ids[row, : len(seq)] = seq
                attn[row, : len(seq)] = 1
                labels[row, len(p): len(seq)] = seq[len(p):]
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
            logits = logits[:, :-1].float()
            target = labels[:, 1:].to(logits.device)
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total += float(nll.double())
            count += int((target != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("the benign pairs have no response tokens (empty responses?)")
    loss = total / count
    logger.info("benign loss %.4f (perplexity %.2f) over %d response tokens of %d pairs",
                loss, math.exp(min(loss, 700.0)), count, len(items))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "n": len(items),
            "truncated": truncated}


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
) -> dict:
    """Safety (ASR) and utility (benign loss) of one checkpoint.

    Args:
        model: a loaded model (then pass ``tokenizer``) or a spec for :func:`load_model` (``tiny:llama``, a folder,
            a hub name).
        harmful / benign: prompt lists / pair lists, or sources for :func:`load_harmful` / :func:`load_benign`
            (default: AdvBench eval split / held-out benign rows).
        limit: evaluate the first ``limit`` harmful prompts only; ``benign_limit`` the same for benign pairs
            (defaults to ``limit``).
        safety / utility: switch either part off.
        dtype / device: used when ``model`` is a spec to load.

    Returns:
        ``{"name", "model", "asr", "refusal_rate", "n_harmful", "benign_loss", "perplexity", "benign_tokens",
        "n_benign", "judge", "generation", "details": {"flags", "matched", "responses", "prompts"}}`` (missing parts
        are ``None``).
    """
    spec = None
    if isinstance(model, (str, os.PathLike)):
        spec = str(model)
        model, tokenizer = load_model(spec, dtype=dtype, device=device)
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
