"""Automatic class sizes (``LocateConfig.auto``): an ablation sweep on held-apart data.

Candidate SCU / RU sets are zeroed on the model in place (:func:`ssah_plugin.locate.ablation.zero_units`) and
restored bit-exactly after each measurement; the model ends as it started. Generation and loss evaluation only:
no hooks, no gradients. :func:`choose_sizes` holds the decision logic, independent of models.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable

from ssah_plugin.core.mask import CLASS_CODES, Mask
from ssah_plugin.evaluation import generation
from ssah_plugin.evaluation.judge import RefusalJudge
from ssah_plugin.evaluation.metrics import benign_loss
from ssah_plugin.locate.ablation import restore_units, zero_units
from ssah_plugin.locate.config import LocateConfig
from ssah_plugin.locate.scores import classify, reclassify

__all__ = ["measure", "choose_sizes", "auto_sizes"]

logger = logging.getLogger(__name__)


def measure(model, tokenizer, held: dict, cfg: LocateConfig) -> dict:
    """Refusal rate (greedy replies, keyword judge of Wei et al.) on held-apart harmful prompts and mean benign
    response loss on held-apart utility pairs."""
    judge = RefusalJudge()
    prompts = [p for p, _ in held["safety"]]
    replies = generation.generate(model, tokenizer, prompts, max_new_tokens=cfg.auto_max_new_tokens,
                                  batch_size=cfg.batch_size, progress=False)
    refusal = sum(judge.is_refusal(r) for r in replies) / max(len(replies), 1)
    loss = benign_loss(model, tokenizer, held["utility"], batch_size=cfg.batch_size,
                       max_length=cfg.max_length or 512, progress=False)["loss"]
    return {"refusal_rate": float(refusal), "benign_loss": float(loss)}


def choose_sizes(baseline: dict, measure_fn: Callable[[str, float, float], dict], cfg: LocateConfig) -> dict:
    """The sweep logic, independent of models (``measure_fn(class_name, fraction, scu_fraction)`` ablates the
    units of that class at that size, with SCU at ``scu_fraction``, and measures).

    * SCU: grid ascending; the first size whose removal lowers the refusal rate by at least ``auto_refusal_drop``
      with the benign loss within ``auto_utility_tolerance`` (relative) is chosen. The sweep stops at that size,
      or at the first size that breaks the utility tolerance (then the configured size is kept, with a warning).
    * RU: grid ascending with the chosen SCU; the largest size before the first one whose removal lowers the
      refusal rate by more than ``auto_ru_refusal_tolerance`` or breaks the utility tolerance.
    """
    r0, l0 = baseline["refusal_rate"], baseline["benign_loss"]
    max_loss = l0 * (1.0 + cfg.auto_utility_tolerance) if l0 >= 0 else l0 * (1.0 - cfg.auto_utility_tolerance)
    out: dict = {"baseline": baseline, "scu_sweep": [], "ru_sweep": []}
    scu = None
    if r0 < cfg.auto_refusal_drop:
        warnings.warn(f"auto mode: the model refuses only {r0:.0%} of the held-apart harmful prompts, less than the "
                      f"required drop {cfg.auto_refusal_drop:.0%}; keeping the configured SCU size {cfg.scu}",
                      stacklevel=3)
    else:
        for f in sorted(cfg.auto_scu_grid):
            m = measure_fn("SCU", f, f)
            out["scu_sweep"].append({"fraction": f, **m})
            if m["benign_loss"] > max_loss:
                break
            if r0 - m["refusal_rate"] >= cfg.auto_refusal_drop:
                scu = f
                break
        if scu is None:
            warnings.warn("auto mode: no SCU size in the grid met the thresholds; keeping the configured size "
                          f"{cfg.scu} (see method['auto'] in the mask)", stacklevel=3)
    out["scu"] = cfg.scu if scu is None else scu
    ru = 0.0
    for f in sorted(cfg.auto_ru_grid):
        m = measure_fn("RU", f, out["scu"])
        out["ru_sweep"].append({"fraction": f, **m})
        if m["benign_loss"] > max_loss or r0 - m["refusal_rate"] > cfg.auto_ru_refusal_tolerance:
            break
        ru = f
    if ru == 0.0:
        warnings.warn("auto mode: removing even the smallest RU size broke a threshold; RU is empty", stacklevel=3)
    out["ru"] = ru
    return out


def auto_sizes(model, tokenizer, mask: Mask, held: dict, cfg: LocateConfig) -> Mask:
    """Choose SCU and RU sizes by zeroing candidate units on ``model`` (restored bit-exactly after each try)."""
    baseline = measure(model, tokenizer, held, cfg)
    logger.info("auto: baseline refusal rate %.3f, benign loss %.4f", baseline["refusal_rate"],
                baseline["benign_loss"])

    def measure_fn(cls: str, frac: float, scu: float) -> dict:
        sizes = {"scu": scu, "ucu": cfg.ucu, "ru": cfg.ru, cls.lower(): frac}
        sizes["ucu"] = min(sizes["ucu"], max(0.0, 1 - sizes["scu"] - sizes["ru"]))
        codes = classify(mask.scores["safety_z"], mask.scores["utility_z"], order=cfg.class_order, **sizes)
        saved = zero_units(model, mask, [c == CLASS_CODES[cls] for c in codes], keep=True)
        try:
            m = measure(model, tokenizer, held, cfg)
        finally:
            restore_units(saved)
        logger.info("auto: %s %.4f -> refusal rate %.3f, benign loss %.4f", cls, frac, m["refusal_rate"],
                    m["benign_loss"])
        return m

    result = choose_sizes(baseline, measure_fn, cfg)
    ucu = min(cfg.ucu, max(0.0, 1 - result["scu"] - result["ru"]))
    reclassify(mask, scu=result["scu"], ucu=ucu, ru=result["ru"])
    mask.method["auto"] = result
    return mask
