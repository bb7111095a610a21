"""Refusal replay: keep a small share of the aligned model's own refusals in the fine-tuning stream.

Fine-tuning on benign data moves mostly the first reply tokens (Qi et al. 2024), and any trainable path into the
logits can carry that move, which is why freezing units alone does not keep a model refusing. Replaying a few of
the model's *own* refusals (what it answered to harmful prompts before fine-tuning) keeps a safety signal in the
training objective itself. It is a data-level change, so it works with every Trainer / TRL trainer, accelerate,
DeepSpeed ZeRO (each rank's sampler sees the mixed rows) and LoRA, and composes with :class:`SSAHCallback`::

    from ssah_plugin import with_refusal_replay

    train_dataset = with_refusal_replay(train_dataset, "refusals.jsonl", share=0.05)   # <- the one added line

The refusals file is written once per base model by ``ssah-plugin refusals`` (or :func:`collect_refusals`).

Exact behaviour (:func:`plan_replay`): for ``n`` user rows and share ``s`` the result has ``r = round(s * n / (1 - s))``
refusal rows (at least one) inserted at seeded random positions; the user rows keep their order; refusals are drawn
in a seeded order that uses each refusal once before any is repeated. Replay rows take the format of the user's
rows (detected from the first row):

=========================  ==================================================================================
user rows                  replay row
=========================  ==================================================================================
``messages``               ``{"messages": [user, assistant]}`` (conversational SFT, TRL's default)
``prompt`` + ``completion`` conversational lists -> lists of messages; strings -> the chat template's prompt text
                           and the refusal (needs ``tokenizer``)
``input_ids`` (tokenized)  chat-formatted ids with ``labels`` -100 on the prompt (needs ``tokenizer``,
                           ``max_length``), as :func:`ssah_plugin.data.rows.sft_examples`
``text``                   the whole conversation rendered by the chat template (needs ``tokenizer``)
``instruction`` + ``output`` ``{"instruction": prompt, "input": "", "output": refusal}`` (Alpaca / Dolly style)
=========================  ==================================================================================

Preference data (``chosen`` / ``rejected``) is refused: replay is for supervised rows. Columns of a Hugging Face
dataset that replay rows cannot fill are set to ``None`` with a warning that names them.
"""
from __future__ import annotations

import logging
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from ssah_plugin.errors import DataError, UnsupportedSetupError

__all__ = ["with_refusal_replay", "plan_replay", "ReplayPlan", "load_refusals", "replay_rows", "ReplayDataset",
           "collect_refusals", "save_refusals", "DEFAULT_SHARE"]

logger = logging.getLogger(__name__)

#: the share used when none is given. On Qwen2.5-Coder-0.5B-Instruct (docs/results-real-model.md) 5% kept the
#: refusals through benign fine-tuning (3 seeds) but not through 160 harmful rows, where 20% held (3 seeds).
DEFAULT_SHARE = 0.05


@dataclass(frozen=True)
class ReplayPlan:
    """Where the refusal rows go. ``order[i]`` is ``("user", k)`` or ``("replay", j)``: row ``i`` of the result is the
    user's row ``k`` or refusal ``j``."""

    n_user: int
    n_replay: int
    order: tuple[tuple[str, int], ...]

    @property
    def share(self) -> float:
        """The realised share of refusal rows in the result."""
        return self.n_replay / max(1, self.n_user + self.n_replay)


def plan_replay(n_user: int, n_refusals: int, share: float = DEFAULT_SHARE, seed: int = 0) -> ReplayPlan:
    """The exact interleaving for ``n_user`` user rows and a pool of ``n_refusals`` refusals (see the module doc)."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) < 1.0:
        raise DataError(f"replay share must be a number strictly between 0 and 1 (the fraction of refusal rows in "
                        f"the training stream, e.g. 0.05), got {share!r}")
    if n_user < 1:
        raise DataError("the training dataset is empty: there is nothing to mix refusals into")
    if n_refusals < 1:
        raise DataError("no refusals to replay: the refusals file is empty. Collect the model's own refusals with "
                        "`ssah-plugin refusals --model BASE -o refusals.jsonl`")
    n_replay = max(1, round(share * n_user / (1.0 - share)))
    rng = random.Random(seed)
    slots = set(rng.sample(range(n_user + n_replay), n_replay))
    picks: list[int] = []
    while len(picks) < n_replay:  # each refusal once per cycle, a fresh seeded order per cycle
        cycle = list(range(n_refusals))
        rng.shuffle(cycle)
        picks.extend(cycle)
    order: list[tuple[str, int]] = []
    u = r = 0
    for i in range(n_user + n_replay):
        if i in slots:
            order.append(("replay", picks[r]))
            r += 1
        else:
            order.append(("user", u))
            u += 1
    return ReplayPlan(n_user=n_user, n_replay=n_replay, order=tuple(order))


def load_refusals(source: str | os.PathLike | Sequence[Any]) -> list[tuple[Any, str]]:
    """(prompt, refusal) pairs from a file (JSONL / JSON / CSV / Parquet with ``prompt`` + ``response`` columns, or
    ``messages``), ``shipped:NAME``, a list of such rows, or a list of (prompt, response) pairs."""
    from ssah_plugin.data.rows import load_rows, pairs_from_rows

    if isinstance(source, (list, tuple)):
        if not source:
            raise DataError("no refusals to replay: the list is empty")
        if all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], str) for p in source):
            pairs = [(p[0], p[1]) for p in source]
        else:
            pairs = pairs_from_rows(list(source), where="refusals")
    else:
        pairs = pairs_from_rows(load_rows(os.fspath(source) if not isinstance(source, str) else source),
                                where="refusals")
    if not pairs:
        raise DataError("no refusals to replay: the refusals source holds no rows")
    return pairs


def _user_messages(prompt: Any) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def _detect_format(row: Any) -> str:
    if not isinstance(row, dict):
        raise DataError(f"replay needs rows that are dicts (records); the dataset's first row is a "
                        f"{type(row).__name__}")
    if "chosen" in row or "rejected" in row:
        raise UnsupportedSetupError(
            "refusal replay is for supervised fine-tuning rows; this dataset holds preference pairs "
            "(chosen/rejected). For DPO-style training, add refusal pairs (chosen = refusal) to your preference data "
            "instead, or use replay in the SFT stage")
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    if "input_ids" in row:
        return "tokenized"
    if "text" in row:
        return "text"
    if "instruction" in row and "output" in row:
        return "instruction"
    raise DataError(f"cannot tell the format of the training rows (columns {sorted(row)}); replay understands "
                    "'messages', 'prompt'+'completion', 'input_ids', 'text' and 'instruction'+'output' rows")


def replay_rows(pairs: Sequence[tuple[Any, str]], like: dict, *, tokenizer=None,
                max_length: int | None = None) -> list[dict]:
    """Format each (prompt, refusal) pair as a row of the same format as the user's row ``like``."""
    fmt = _detect_format(like)

    def need_tokenizer(what: str):
        if tokenizer is None:
            raise DataError(f"the training rows are {what}; pass tokenizer= (the model's tokenizer, with its chat "
                            "template) so replay rows can be formatted the same way")

    out: list[dict] = []
    if fmt == "tokenized":
        need_tokenizer("tokenized (input_ids)")
        if max_length is None:
            raise DataError("the training rows are tokenized; pass max_length= (the length your rows were cut to)")
        from ssah_plugin.data.rows import sft_examples

        rows = sft_examples(tokenizer, pairs, max_length=max_length, drop_unlabelled=False)
        short = [i for i, r in enumerate(rows) if all(x == -100 for x in r["labels"])]
        if short:  # over-long rows keep their refusal (data.rows.fit_pair): only an empty one gets here
            raise DataError(f"{len(short)} replay row(s) carry no refusal token once formatted (first: refusal "
                            f"{short[0]}): an empty refusal, or a chat template that renders nothing after the "
                            "generation prompt. Fix: drop empty refusals, or use the model's own chat template")
        keep = [k for k in ("input_ids", "attention_mask", "labels") if k in like]
        if "labels" not in like:
            warnings.warn("the tokenized training rows carry no 'labels', so the collator will train on every token "
                          "of the replayed refusals, their prompts included", stacklevel=3)
        return [{k: r[k] for k in keep} for r in rows]
    for prompt, refusal in pairs:
        if fmt == "messages":
            out.append({"messages": _user_messages(prompt) + [{"role": "assistant", "content": refusal}]})
        elif fmt == "prompt-completion":
            if isinstance(like["prompt"], list):
                out.append({"prompt": _user_messages(prompt),
                            "completion": [{"role": "assistant", "content": refusal}]})
            else:
                need_tokenizer("plain-text prompt/completion strings")
                from ssah_plugin.data.chat import chat_prompt

                out.append({"prompt": chat_prompt(tokenizer, prompt), "completion": refusal})
        elif fmt == "text":
            need_tokenizer("plain text")
            msgs = _user_messages(prompt) + [{"role": "assistant", "content": refusal}]
            out.append({"text": tokenizer.apply_chat_template(msgs, tokenize=False)})
        else:  # instruction
            if not isinstance(prompt, str):
                raise DataError("instruction/output training rows take text prompts; the refusals hold chat "
                                "message lists")
            row = {"instruction": prompt, "output": refusal}
            if "input" in like:
                row["input"] = ""
            out.append(row)
    return out


class ReplayDataset:
    """A map-style dataset (``torch.utils.data.Dataset`` protocol): the user's dataset with refusal rows inserted
    as :class:`ReplayPlan` says. Items are read from the user's dataset on access (nothing is copied)."""

    def __init__(self, dataset, rows: Sequence[dict], plan: ReplayPlan):
        self.dataset, self.rows, self.plan = dataset, list(rows), plan

    def __len__(self) -> int:
        return len(self.plan.order)

    def __getitem__(self, i: int):
        kind, k = self.plan.order[i]
        return self.dataset[k] if kind == "user" else self.rows[k]


def with_refusal_replay(dataset, refusals, share: float = DEFAULT_SHARE, *, seed: int = 0, tokenizer=None,
                        max_length: int | None = None):
    """The training dataset with a ``share`` of refusal rows mixed in (see the module docstring).

    ``dataset``: a list of dicts, a Hugging Face ``datasets.Dataset`` (returns a ``Dataset``: the user's rows are not
    copied, the order is an index mapping), or any map-style dataset with ``__len__`` / ``__getitem__`` (returns a
    :class:`ReplayDataset`). Streaming (iterable) datasets are refused: their length is unknown, so the share could
    not be exact. ``refusals``: a path, ``shipped:NAME`` or rows, see :func:`load_refusals`. Call it before the
    trainer is built; under DeepSpeed / DDP every rank must use the same ``seed`` (the default).

    ``share``: 0.05 is what kept a real model refusing through benign fine-tuning. If the data may contain harmful
    requests, use a larger share: 0.2 held against a harmful fine-tuning attack where 0.05 did not (3 seeds), on
    AdvBench-style requests; on the attack's own kind of request it kept only a third (one seed).
    """
    try:
        import datasets as hf_datasets
    except ImportError:  # the [data] extra; plain lists and torch datasets work without it
        hf_datasets = None
    if hf_datasets is not None and isinstance(dataset, (hf_datasets.IterableDataset, hf_datasets.IterableDatasetDict)):
        raise UnsupportedSetupError("refusal replay needs a map-style dataset with a known length so the share is "
                                    "exact; this is a streaming (iterable) dataset. Load it without streaming=True")
    if hf_datasets is not None and isinstance(dataset, hf_datasets.DatasetDict):
        raise DataError("pass one split (e.g. dataset['train']), not a DatasetDict")
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise UnsupportedSetupError(f"refusal replay needs a map-style dataset (__len__ and __getitem__); got "
                                    f"{type(dataset).__name__}")
    n_user = len(dataset)
    if n_user == 0:
        raise DataError("the training dataset is empty: there is nothing to mix refusals into")
    pairs = load_refusals(refusals)
    plan = plan_replay(n_user, len(pairs), share, seed)
    rows = replay_rows(pairs, dataset[0], tokenizer=tokenizer, max_length=max_length)
    logger.info("refusal replay: %d refusal rows (from %d distinct) among %d rows (%.1f%%)", plan.n_replay,
                len(pairs), n_user + plan.n_replay, 100 * plan.share)
    if isinstance(dataset, list):
        return [dataset[k] if kind == "user" else rows[k] for kind, k in plan.order]
    if hf_datasets is not None and isinstance(dataset, hf_datasets.Dataset):
        return _hf_mixed(hf_datasets, dataset, rows, plan)
    return ReplayDataset(dataset, rows, plan)


def _hf_mixed(hf_datasets, dataset, rows: Sequence[dict], plan: ReplayPlan):
    missing = [c for c in dataset.column_names if c not in rows[0]]
    if missing:
        warnings.warn(f"refusal replay: the replayed rows have no value for the column(s) {missing}; they are set "
                      "to None there", stacklevel=3)
    extra = [c for c in rows[0] if c not in dataset.column_names]
    if extra:
        raise DataError(f"refusal replay: the replayed rows need the column(s) {extra}, which the dataset lacks")
    table = {c: [r.get(c) for r in rows] for c in dataset.column_names}
    try:
        replay = hf_datasets.Dataset.from_dict(table, features=dataset.features)
    except Exception as exc:  # a feature type the refusal rows cannot be cast to
        raise DataError(f"refusal replay: the replayed rows do not fit the dataset's features ({type(exc).__name__}: "
                        f"{exc}); convert the dataset to one of the formats the module docstring lists") from None
    both = hf_datasets.concatenate_datasets([dataset, replay])
    n = len(dataset)
    return both.select([k if kind == "user" else n + k for kind, k in plan.order])


def collect_refusals(model, tokenizer, prompts: Sequence[Any], *, max_new_tokens: int = 64, batch_size: int = 8,
                     progress: bool = True) -> list[tuple[Any, str]]:
    """The model's own greedy replies to harmful ``prompts`` that the keyword judge reads as refusals.

    The same collection ``locate --own-refusals`` uses (:func:`ssah_plugin.evaluation.refusals.own_refusals`); run
    it on the base (aligned) model before fine-tuning, on prompts that are not in your evaluation set.
    """
    from ssah_plugin.evaluation.refusals import own_refusals

    return [(p, r.strip()) for p, r in own_refusals(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size, progress=progress) if r.strip()]


def save_refusals(pairs: Sequence[tuple[Any, str]], path: str | os.PathLike) -> None:
    """Write (prompt, refusal) pairs as JSONL rows ``{"prompt": ..., "response": ...}`` (the format
    :func:`load_refusals` and ``locate --safety`` read)."""
    import json
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for prompt, refusal in pairs:
            f.write(json.dumps({"prompt": prompt, "response": refusal}, ensure_ascii=False) + "\n")
