"""The evaluation sets: harmful prompts (AdvBench splits or a file) and held-out benign pairs.

* Harmful: the shipped AdvBench rows carry ``prompt``, ``target``, ``split`` (``eval``: ids 0-99, the prompts Wei
  et al. evaluate on; ``calib``: the other 420, for calibration) and ``id``. Default: :data:`HARMFUL_DEFAULT`.
* Benign: the rows of the shipped ``benign_instructions.jsonl`` whose index is ``9 (mod 10)`` are held out
  (:data:`BENIGN_HELDOUT`, 156 rows, all three sources); keep them out of calibration and fine-tuning
  (:func:`benign_split` gives the other rows as ``"train"``).

Both loaders also read any source :func:`ssah_plugin.data.rows.load_rows` reads.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from ssah_plugin.data.rows import Pair, load_rows, pairs_from_rows, prompts_from_rows
from ssah_plugin.errors import DataError

__all__ = ["BENIGN_HELDOUT", "HARMFUL_DEFAULT", "benign_split", "harmful_rows", "load_benign", "load_harmful"]

#: Default harmful prompts: AdvBench ``eval`` split (ids 0-99; Wei et al. evaluate on these).
HARMFUL_DEFAULT = "advbench:eval"
#: Default benign evaluation data: rows ``i`` of ``benign_instructions.jsonl`` with ``i % 10 == 9``.
BENIGN_HELDOUT = "benign:heldout"
_HELDOUT_MOD, _HELDOUT_REM = 10, 9


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
