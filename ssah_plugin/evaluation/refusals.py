"""The model's own refusals: greedy replies to harmful prompts, kept where the keyword judge finds a refusal.

Used as safety calibration data by ``locate --own-refusals`` (:mod:`ssah_plugin.locate.inputs`) and as the replayed
rows of the refusal-replay recipe (:func:`ssah_plugin.recipes.replay.collect_refusals`). Generation only (no
gradients, no hooks); the replies are never logged.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from ssah_plugin.errors import DataError
from ssah_plugin.evaluation import generation
from ssah_plugin.evaluation.judge import RefusalJudge

__all__ = ["own_refusals"]

logger = logging.getLogger(__name__)


def own_refusals(model, tokenizer, prompts: Sequence[Any], *, max_new_tokens: int = 64, batch_size: int = 8,
                 progress: bool = True) -> list[tuple[Any, str]]:
    """The model's own greedy replies to harmful ``prompts``, kept where the keyword judge finds a refusal phrase.

    Uses :func:`ssah_plugin.evaluation.generation.generate` and :class:`ssah_plugin.evaluation.judge.RefusalJudge`
    (phrase match only, the 20-word rule is off: a short refusal is still a refusal, a short non-answer is not).
    Returns ``(prompt, reply)`` pairs in the order of ``prompts``. Raises :class:`DataError` if no reply is a
    refusal.
    """
    judge = RefusalJudge(min_words=0)
    replies = generation.generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, progress=progress)
    kept = [(p, r) for p, r in zip(prompts, replies) if judge.is_refusal(r)]
    logger.info("own refusals: %d of %d replies are refusals", len(kept), len(replies))
    if not kept:
        raise DataError(
            f"own refusals: none of the model's {len(replies)} replies to the safety prompts contains a refusal "
            "phrase, so there is no safety calibration data. The model may not be safety-aligned, or it refuses in "
            "words the judge does not know: pass a safety file with refusals (prompt/response rows) instead"
        )
    return kept
