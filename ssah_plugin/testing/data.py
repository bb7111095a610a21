"""Small seeded inputs shared by the tests: token batches, an LM dataset, prompt/reply rows and their collator."""
from __future__ import annotations

import torch

__all__ = ["random_batches", "lm_rows", "lm_dataset", "prompt_reply_rows", "pad_collate"]


def random_batches(n: int, seed: int = 0, shape: tuple[int, int] = (2, 16), vocab: int = 500,
                   device: torch.device | str | None = None) -> list[torch.Tensor]:
    """``n`` batches of token ids in ``[3, vocab)`` (ids 0-2 are pad / bos / eos of the tiny tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, shape, generator=g).to(device) for _ in range(n)]


def lm_rows(n: int = 24, seq: int = 16, seed: int = 0, vocab: int = 500) -> list[dict[str, list[int]]]:
    """``n`` random rows with ``labels == input_ids`` as a plain list (a map-style dataset the Trainer accepts, for
    machines without the ``datasets`` package)."""
    ids = torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{"input_ids": row, "labels": list(row)} for row in ids]


def lm_dataset(n: int = 24, seq: int = 16, seed: int = 0, vocab: int = 500):
    """:func:`lm_rows` as a ``datasets.Dataset`` (plain language modelling)."""
    from datasets import Dataset

    rows = lm_rows(n, seq, seed, vocab)
    return Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})


def prompt_reply_rows(lengths: list[tuple[int, int]], seed: int = 0, vocab: int = 500):
    """A ``datasets.Dataset`` with one row per ``(prompt, reply)`` length: labels ``-100`` on the prompt."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    data = []
    for prompt, reply in lengths:
        ids = torch.randint(3, vocab, (prompt + reply,), generator=g).tolist()
        data.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return Dataset.from_list(data)


def pad_collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (0), ``attention_mask`` and ``labels`` (-100) to the longest row."""
    width = max(len(r["input_ids"]) for r in rows)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in rows:
        pad = width - len(r["input_ids"])
        out["input_ids"].append(list(r["input_ids"]) + [0] * pad)
        out["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        out["labels"].append(list(r["labels"]) + [-100] * pad)
    return {k: torch.tensor(v) for k, v in out.items()}
