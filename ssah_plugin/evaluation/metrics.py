"""The evaluation numbers of one model: attack success rate, over-refusal, benign loss.

* **Safety**: :func:`attack_success_rate`: greedy chat-template replies to harmful prompts
  (:func:`ssah_plugin.evaluation.generation.generate`), scored by the keyword judge
  (:class:`ssah_plugin.evaluation.judge.RefusalJudge`).
* **Over-refusal**: :func:`false_refusal_rate`: the share of greedy replies to benign prompts that refuse.
* **Utility**: :func:`benign_loss`: mean token negative log-likelihood (and perplexity) of reference responses to
  benign instructions, on response tokens only, with the chat template applied. Over-long pairs are cut by the one
  truncation rule (:func:`ssah_plugin.data.rows.fit_pair`). The loss is formed in chunks of response positions
  from the final hidden states through the LM head, so no ``[batch, length, vocab]`` float32 logits are built.

Harmful prompts and replies are never logged: logs carry counts and rates only.
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ssah_plugin.core.units import unwrap_model
from ssah_plugin.data.chat import Prompt, chat_pair_ids
from ssah_plugin.data.rows import fit_pair, pairs_from_rows, warn_truncated
from ssah_plugin.errors import DataError
from ssah_plugin.evaluation.generation import generate
from ssah_plugin.evaluation.judge import RefusalJudge
from ssah_plugin.evaluation.stats import wilson_interval
from ssah_plugin.io.models import max_positions, model_device, pad_id_of

__all__ = ["LOSS_CHUNK", "attack_success_rate", "benign_loss", "false_refusal_rate"]

logger = logging.getLogger(__name__)

#: Response positions whose logits :func:`benign_loss` forms at once (float32 memory: chunk x vocab x 4 bytes).
LOSS_CHUNK = 1024
#: Config fields of models whose logits are not ``lm_head(final hidden state)`` (Gemma-2 soft-capping, Cohere and
#: Granite scaling): their loss uses the model's own logits.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


# ---------------------------------------------------------------------------------------------------- safety
def attack_success_rate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    judge: RefusalJudge | None = None,
    **gen_kwargs: Any,
) -> dict:
    """Attack success rate of greedy replies to ``prompts`` under ``judge`` (default :class:`RefusalJudge`).

    ``gen_kwargs`` go to :func:`ssah_plugin.evaluation.generation.generate` (``max_new_tokens``, ``batch_size``,
    ``system``, ``progress``).

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
    (e.g. the prompts of :func:`ssah_plugin.data.eval_sets.load_benign`), never ones the model was calibrated or
    fine-tuned on.

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


def _head_path(model) -> tuple[nn.Module, nn.Linear] | None:
    """``(decoder body, LM head)`` when the model's logits are ``head(body output)`` and its forward takes
    ``logits_to_keep`` (transformers causal LMs); ``None`` otherwise (then its own logits are used)."""
    root = unwrap_model(model)
    cfg = getattr(root, "config", None)
    cfg = cfg.get_text_config() if callable(getattr(cfg, "get_text_config", None)) else cfg
    if any(getattr(cfg, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING):
        return None
    get_decoder, get_head = getattr(root, "get_decoder", None), getattr(root, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)):
        return None
    try:
        takes_keep = "logits_to_keep" in inspect.signature(root.forward).parameters
    except (TypeError, ValueError):
        takes_keep = False
    body, head = get_decoder(), get_head()
    if not takes_keep or not isinstance(body, nn.Module) or body is root or not isinstance(head, nn.Linear):
        return None
    return body, head


def _last_hidden(output) -> torch.Tensor | None:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        hidden = output[0]
    return hidden if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None


def _hidden_forward(model, path: tuple[nn.Module, nn.Linear], ids: torch.Tensor,
                    attn: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One forward that keeps the body's final hidden states ``[B, W, d]`` (forward hook) and asks the model for
    the logits of the last position only; returns ``(hidden or None, last-position logits [B, V])``."""
    body, _ = path
    seen: dict[str, torch.Tensor | None] = {}

    def keep(_module, _inputs, output) -> None:
        seen["h"] = _last_hidden(output)

    handle = body.register_forward_hook(keep)
    try:
        out = model(input_ids=ids, attention_mask=attn, logits_to_keep=1)
    finally:
        handle.remove()
    return seen.get("h"), out.logits[:, -1]


def _head_matches(head: nn.Linear, hidden: torch.Tensor, logits_last: torch.Tensor) -> bool:
    """True when ``head(hidden)`` reproduces the model's own logits at the last position (no post-processing)."""
    mine, ref = head(hidden[:, -1]).float(), logits_last.float()
    if mine.shape != ref.shape:
        return False
    tol = 1e-4 if ref.dtype == torch.float32 and hidden.dtype == torch.float32 else 2e-2
    return bool(torch.allclose(mine, ref, rtol=tol, atol=tol * max(float(ref.abs().max()), 1.0)))


def _chunked_nll(logits_of, n: int, target: torch.Tensor, chunk: int) -> float:
    """Sum of token NLLs: ``logits_of(a, b)`` gives the (any-dtype) logits of selected positions ``a:b``."""
    total = 0.0
    for a in range(0, n, chunk):
        logits = logits_of(a, min(a + chunk, n)).float()
        total += float(torch.nn.functional.cross_entropy(logits, target[a:a + chunk], reduction="sum").double())
    return total


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
    chunk_size: int = LOSS_CHUNK,
) -> dict:
    """Mean token NLL of the responses in ``pairs`` given their prompts (chat template applied).

    Only response tokens count (the assistant turn after the generation prompt: content and end-of-turn marker).
    The mean is over all response tokens of all pairs (token-weighted). A pair longer than ``max_length`` tokens
    is cut by :func:`ssah_plugin.data.rows.fit_pair` (it keeps the end of its prompt, the whole prompt when it is
    short, and the start of its response); ``truncated`` counts them and one warning per call says how many.
    ``max_length`` is lowered to the model's ``max_position_embeddings`` when that is smaller.

    Memory: each batch runs one forward that keeps the final hidden states and asks the model for the logits of
    one position only (``logits_to_keep=1``); the response positions then go through the LM head ``chunk_size``
    at a time, in float32. Models whose logits are not ``lm_head(hidden)`` (soft-capped or scaled logits, or a
    forward without ``logits_to_keep``) use their own logits, still upcast ``chunk_size`` positions at a time.

    Args:
        pairs: ``(prompt, response)`` tuples, or dicts with ``prompt``/``response`` or ``instruction``/``output``.

    Returns:
        ``{"loss", "perplexity", "tokens", "n", "truncated"}``.
    """
    if max_length < 2 or batch_size < 1 or chunk_size < 1:
        raise ValueError(f"max_length must be >= 2, batch_size and chunk_size >= 1 (got {max_length}, {batch_size}, "
                         f"{chunk_size})")
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
    pad_id = pad_id_of(tokenizer)
    device = model_device(model)
    path = _head_path(model)
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
            rows, cols, targets = [], [], []
            for row, i in enumerate(batch):
                p, r, _ = items[i]
                seq = p + r
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attn[row, : len(seq)] = 1
                for k in range(max(0, 1 - len(p)), len(r)):  # position len(p)-1+k predicts response token k
                    rows.append(row)
                    cols.append(len(p) - 1 + k)
                    targets.append(r[k])
            ids, attn = ids.to(device), attn.to(device)
            n = len(targets)
            if n == 0:
                continue
            rows_t = torch.tensor(rows, device=device)
            cols_t = torch.tensor(cols, device=device)
            target = torch.tensor(targets, dtype=torch.long, device=device)
            hidden = None
            if path is not None:
                hidden, last = _hidden_forward(model, path, ids, attn)
                if hidden is None or not _head_matches(path[1], hidden, last):
                    logger.info("benign loss: this model's logits are not lm_head(hidden); using its own logits")
                    path, hidden = None, None
            if hidden is not None:
                head = path[1]
                selected = hidden[rows_t.to(hidden.device), cols_t.to(hidden.device)]  # [n, d]: response only
                selected = selected.to(head.weight.device)
                total += _chunked_nll(lambda a, b: head(selected[a:b]), n, target.to(head.weight.device),
                                      chunk_size)
            else:
                logits = model(input_ids=ids, attention_mask=attn).logits
                rows_l, cols_l = rows_t.to(logits.device), cols_t.to(logits.device)
                total += _chunked_nll(lambda a, b: logits[rows_l[a:b], cols_l[a:b]], n, target.to(logits.device),
                                      chunk_size)
                del logits
            count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("the benign pairs have no response tokens (empty responses?)")
    loss = total / count
    logger.info("benign loss %.4f (perplexity %.2f) over %d response tokens of %d pairs",
                loss, math.exp(min(loss, 700.0)), count, len(items))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "n": len(items),
            "truncated": truncated}
