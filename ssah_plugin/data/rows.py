"""Calibration data for ``locate``: read rows, pick the text fields, and tokenise prompt/response pairs.

Sources (:func:`load_rows`): a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, the word ``shipped:NAME``
for a file shipped in ``ssah_plugin/data`` (e.g. ``shipped:safety_refusals.jsonl``), or a Hugging Face ``datasets``
name (``org/name`` or ``org/name:split``; needs ``pip install 'ssah-plugin[data]'`` and network access).

Field names are auto-detected (:func:`pairs_from_rows`), and can be overridden:

=====================  ===========================================================================================
row shape              meaning
=====================  ===========================================================================================
``prompt, response``   safety rows (``safety_refusals.jsonl``): harmful prompt + the aligned model's refusal
``instruction, input,  utility rows (``benign_instructions.jsonl``, Alpaca / Dolly style); ``input`` is appended
output``               to the instruction after a blank line when not empty
``prompt, target``     AdvBench rows: prompts only (usable with ``own_refusals``, which generates the responses)
``messages``           a chat: list of ``{role, content}``; the last assistant turn is the response
=====================  ===========================================================================================

Harmful text is never logged: errors and logs name rows by index and show at most a 40-character preview hash.
"""
from __future__ import annotations

import hashlib
import logging
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssah_plugin.data import shipped_data_path
from ssah_plugin.data.chat import chat_pair_ids
from ssah_plugin.data.files import load_hub_dataset, read_file
from ssah_plugin.errors import DataError

__all__ = ["Pair", "EncodedPair", "load_rows", "pairs_from_rows", "prompts_from_rows", "load_pairs", "encode_pairs",
           "sft_examples", "fit_pair", "warn_truncated", "sample_rows", "text_id"]

logger = logging.getLogger(__name__)

#: (prompt, response); the prompt may also be a list of chat messages.
Pair = tuple[Any, str]

_PROMPT_KEYS = ("prompt", "instruction", "question", "goal", "query")
_RESPONSE_KEYS = ("response", "output", "answer", "completion", "chosen")


def text_id(text: str) -> str:
    """A short stable id for a possibly harmful text (for logs and errors; never the text itself)."""
    return hashlib.sha256(str(text).encode("utf-8")).hexdigest()[:10]


def load_rows(source: str | Path | Sequence[dict], *, split: str | None = None) -> list[dict]:
    """Rows (dicts) of a calibration source; see the module docstring for the accepted sources.

    A list of dicts is returned as is. Raises :class:`DataError` for a missing, unreadable or empty source.
    """
    if isinstance(source, (list, tuple)):
        rows = list(source)
        name = "<rows>"
    else:
        text = str(source)
        if text.startswith("shipped:"):
            try:
                path = shipped_data_path(text[len("shipped:"):])
            except FileNotFoundError as exc:
                raise DataError(str(exc)) from None
        else:
            path = Path(text).expanduser()
        name = str(path)
        if path.exists():
            if path.is_dir():
                raise DataError(f"{name!r} is a folder; pass a .jsonl/.json/.csv/.parquet file")
            rows = read_file(path)
        elif text.startswith((".", "/", "~")) or Path(text).suffix in (".jsonl", ".json", ".csv", ".parquet", ".tsv",
                                                                          ".txt"):
            raise DataError(f"calibration data file {name!r} does not exist")
        else:
            rows = load_hub_dataset(text, split)
    if not rows:
        raise DataError(f"calibration data {name!r} is empty (no rows); give a file with at least one row")
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise DataError(f"calibration data {name!r}: row {bad[0]} is not an object/record")
    return rows


def _field(row: dict, explicit: str | None, candidates: Sequence[str]) -> str | None:
    if explicit:
        return explicit
    for key in candidates:
        if key in row:
            return key
    return None


def _prompt_of(row: dict, i: int, prompt_field: str | None, input_field: str | None, where: str) -> Any:
    if prompt_field is None and "messages" in row and isinstance(row["messages"], list):
        msgs = [m for m in row["messages"] if isinstance(m, dict)]
        while msgs and msgs[-1].get("role") == "assistant":
            msgs.pop()
        if not msgs:
            raise DataError(f"{where}: row {i} has a 'messages' list without a user turn")
        return msgs
    key = _field(row, prompt_field, _PROMPT_KEYS)
    if key is None or key not in row:
        raise DataError(
            f"{where}: row {i} has no prompt field (looked for {prompt_field or ' / '.join(_PROMPT_KEYS)}; the row has "
            f"{sorted(row)}). Name the column with --{'safety' if 'safety' in where else 'utility'}-prompt-field"
        )
    prompt = row[key]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: row {i} has an empty or non-text prompt in field {key!r}")
    extra_key = input_field if input_field is not None else ("input" if key == "instruction" else None)
    extra = row.get(extra_key) if extra_key else None
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    return prompt


def _response_of(row: dict, i: int, response_field: str | None, where: str) -> str | None:
    if response_field is None and "messages" in row and isinstance(row["messages"], list):
        for m in reversed(row["messages"]):
            if isinstance(m, dict) and m.get("role") == "assistant":
                return str(m.get("content", ""))
        return None
    key = _field(row, response_field, _RESPONSE_KEYS)
    if key is None or key not in row:
        return None
    value = row[key]
    return value if isinstance(value, str) else None


def pairs_from_rows(rows: Sequence[dict], *, prompt_field: str | None = None, response_field: str | None = None,
                    input_field: str | None = None, where: str = "calibration data") -> list[Pair]:
    """(prompt, response) pairs from rows, auto-detecting the field names unless given.

    Raises :class:`DataError` naming the first row without a usable prompt or response (by index only).
    """
    pairs: list[Pair] = []
    for i, row in enumerate(rows):
        prompt = _prompt_of(row, i, prompt_field, input_field, where)
        response = _response_of(row, i, response_field, where)
        if response is None or not response.strip():
            found = sorted(row)
            hint = (" These look like prompts only (AdvBench): use them with --own-refusals, which generates the "
                    "model's own refusals." if "target" in row else "")
            raise DataError(
                f"{where}: row {i} has no response field (looked for {response_field or ' / '.join(_RESPONSE_KEYS)}; "
                f"the row has {found}). Name the column with the *-response-field option.{hint}"
            )
        pairs.append((prompt, response))
    return pairs


def prompts_from_rows(rows: Sequence[dict], *, prompt_field: str | None = None, input_field: str | None = None,
                      where: str = "calibration data") -> list[Any]:
    """Prompts only (responses, if any, are ignored): AdvBench rows for the own-refusals option."""
    return [_prompt_of(row, i, prompt_field, input_field, where) for i, row in enumerate(rows)]


def sample_rows(rows: Sequence[dict], n: int | None, seed: int) -> list[dict]:
    """``n`` rows drawn without replacement with a seeded RNG, kept in file order (all rows when ``n`` is None)."""
    if n is None or n >= len(rows):
        return list(rows)
    if n < 1:
        raise DataError(f"max_samples must be >= 1, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def load_pairs(source, *, max_samples: int | None = None, seed: int = 0, prompt_field: str | None = None,
               response_field: str | None = None, input_field: str | None = None, split: str | None = None,
               where: str = "calibration data") -> list[Pair]:
    """:func:`load_rows` + :func:`sample_rows` + :func:`pairs_from_rows`."""
    rows = sample_rows(load_rows(source, split=split), max_samples, seed)
    return pairs_from_rows(rows, prompt_field=prompt_field, response_field=response_field, input_field=input_field,
                           where=where)


@dataclass
class EncodedPair:
    """Token ids of one formatted conversation and the positions whose statistics are counted."""

    input_ids: list[int]
    count: list[bool]  # True where the activation at that position enters the statistics


def encode_pairs(tokenizer, pairs: Iterable[Pair], *, tokens: str = "response", max_length: int | None = None,
                 max_positions: int | None = None, where: str = "calibration data") -> list[EncodedPair]:
    """Format pairs with the tokenizer's chat template and choose the counted positions.

    ``tokens="response"`` counts the positions whose *next* token is a response token: the last token of the
    generation prompt (where the model decides to refuse or comply) through the second-to-last response token. These
    are exactly the positions that carry the SFT loss on the response (Wei et al. score on response tokens).
    ``tokens="all"`` counts every non-padding position.

    ``max_length`` truncates longer conversations by :func:`fit_pair` (the one rule: the prompt keeps its end, the
    whole prompt whenever it leaves the response a quarter of the length, and the response keeps its start; one
    warning per call counts such rows). Without it, a conversation longer than ``max_positions`` (the model's maximum positions)
    raises :class:`DataError`.
    """
    if tokens not in ("response", "all"):
        raise ValueError(f"tokens must be 'response' or 'all', got {tokens!r}")
    out: list[EncodedPair] = []
    n_cut = 0
    for i, (prompt, response) in enumerate(pairs):
        p_ids, r_ids = chat_pair_ids(tokenizer, prompt, response)
        ids = p_ids + r_ids
        if max_length is not None and len(ids) > max_length:
            p_ids, r_ids, _ = fit_pair(p_ids, r_ids, max_length)
            ids = p_ids + r_ids
            n_cut += 1
        elif max_positions is not None and len(ids) > max_positions:
            raise DataError(
                f"{where}: row {i} is {len(ids)} tokens long after the chat template, more than the model's "
                f"{max_positions} positions. Pass --max-length {max_positions} (LocateConfig(max_length=...)) to "
                "truncate, or drop long rows"
            )
        if tokens == "all":
            count = [True] * len(ids)
        else:
            start = max(len(p_ids) - 1, 0)
            count = [start <= t < len(ids) - 1 for t in range(len(ids))]
        if not any(count):
            raise DataError(f"{where}: row {i} has no response token to count (empty response); drop the row")
        out.append(EncodedPair(ids, count))
    if not out:
        raise DataError(f"{where}: no calibration examples")
    if max_length is not None:
        warn_truncated(n_cut, len(out), max_length, where)
    return out


def fit_pair(prompt_ids: Sequence[int], response_ids: Sequence[int],
             max_length: int) -> tuple[list[int], list[int], bool]:
    """The one truncation rule for over-long rows (benign loss, SFT rows, locate): ``(prompt, response, truncated)``.

    A pair of at most ``max_length`` tokens is returned unchanged. A longer one keeps the **end of its prompt** and
    the **start of its response**: the response is guaranteed ``min(len(response), max(1, max_length // 4))``
    tokens; the prompt keeps its last tokens up to the rest of the length (the whole prompt whenever it fits, the
    generation prompt, where the model starts answering, always), and the response fills what is left, cut at its
    end. For the usual case, a short prompt and a long reply, this is the standard SFT truncation ``(prompt +
    response)[:max_length]``: the model still sees what it is answering, and the response tokens a loss or a
    statistic counts are the first ones of the reply (where refusals live). A prompt alone longer than the length
    loses its start. Every kept response token has the position before it. ``max_length`` must be >= 2.

    Callers count the ``truncated`` flags and warn once per call (:func:`warn_truncated`).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    p, r = list(prompt_ids), list(response_ids)
    if len(p) + len(r) <= max_length:
        return p, r, False
    reserved = min(len(r), max(1, max_length // 4))  # the reply's guaranteed share
    p = p[max(len(p) - (max_length - reserved), 0):]
    r = r[: max_length - len(p)]
    return p, r, True


def warn_truncated(n_truncated: int, n_rows: int, max_length: int, where: str) -> None:
    """One warning for a call that cut ``n_truncated`` of ``n_rows`` rows with :func:`fit_pair` (none for 0)."""
    if n_truncated:
        warnings.warn(f"{where}: {n_truncated} of {n_rows} rows are longer than max_length={max_length} tokens and "
                      "were truncated (each keeps the end of its prompt and the start of its response)", stacklevel=3)


def sft_examples(tokenizer, pairs: Iterable[Pair], *, max_length: int,
                 drop_unlabelled: bool = True) -> list[dict[str, list[int]]]:
    """Supervised fine-tuning rows: chat-formatted ``input_ids``, ``labels`` -100 on the prompt.

    A conversation longer than ``max_length`` tokens is cut by :func:`fit_pair` (it keeps the end of the prompt,
    the whole prompt when it is short, and the start of the response; one warning per call counts such rows), so
    every row keeps response tokens. A row without any
    (a chat template that renders nothing after the generation prompt) carries no loss and is dropped unless
    ``drop_unlabelled=False``. Pad a batch with
    ``transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)``.
    """
    rows = []
    n, truncated = 0, 0
    for prompt, response in pairs:
        p_ids, r_ids, cut = fit_pair(*chat_pair_ids(tokenizer, prompt, response), max_length)
        n += 1
        truncated += cut
        if drop_unlabelled and not r_ids:
            continue
        ids = p_ids + r_ids
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(p_ids) + r_ids})
    warn_truncated(truncated, n, max_length, "sft_examples")
    return rows
