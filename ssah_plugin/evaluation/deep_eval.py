"""Deep safety evaluation of a base model and its tuned checkpoints, side by side (``ssah-plugin eval --deep``).

For every checkpoint: the prefill attack (ASR vs K), the framing attack (ASR per framing, flip rate), the
judge-free depth signals (refusal log-odds; per-position reply KL to the base; refusal-direction projection kept)
and the over-refusal rate on held-out benign prompts. The **first** checkpoint is the base: its refusal direction
and greedy replies are the reference for the others, it stays loaded while they are evaluated (the KL needs both
models at once), and every 0/1 outcome of a later checkpoint is compared with the base's by an exact McNemar test.

:mod:`ssah_plugin.evaluation.report` renders the results (markdown, JSON) and :mod:`ssah_plugin.evaluation.plots`
the figure.
"""
from __future__ import annotations

import gc
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ssah_plugin.data.eval_sets import load_benign, load_harmful
from ssah_plugin.errors import DataError
from ssah_plugin.evaluation.attacks import (
    DEFAULT_KS,
    Framing,
    framing_attack,
    load_framings,
    load_targets,
    prefill_attack,
)
from ssah_plugin.evaluation.depth import refusal_log_odds, reply_kl
from ssah_plugin.evaluation.direction import direction_kept, refusal_direction
from ssah_plugin.evaluation.generation import generate_ids
from ssah_plugin.evaluation.judge import RefusalJudge
from ssah_plugin.evaluation.metrics import false_refusal_rate
from ssah_plugin.evaluation.stats import mcnemar_exact
from ssah_plugin.io.models import DeviceMap, load_model

__all__ = ["DeepConfig", "load_deep_data", "deep_evaluate", "deep_compare", "paired_vs_base", "ATTACKS"]

logger = logging.getLogger(__name__)

ATTACKS = ("prefill", "framing")


@dataclass
class DeepConfig:
    """What the deep evaluation runs, and how (validated at construction)."""

    attacks: tuple[str, ...] = ATTACKS
    ks: tuple = DEFAULT_KS
    prefill_short: str = "cap"  #: a target shorter than K: prefill it whole ("cap", counted) or raise ("error")
    framings: Sequence[Framing] | None = None  #: default: the shipped framings
    depth: bool = True  #: refusal log-odds, reply KL to the base, refusal direction
    over_refusal: bool = True
    kl_tokens: int = 16
    max_new_tokens: int = 64  #: prefill and framing replies
    refusal_max_new_tokens: int = 48  #: over-refusal replies
    batch_size: int = 8
    system: str | None = None
    judge: RefusalJudge | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad:
            raise DataError(f"unknown attack(s) {bad}; choose from {list(ATTACKS)}")
        if not (self.attacks or self.depth or self.over_refusal):
            raise DataError("the deep evaluation has nothing to run: give an attack, depth or over_refusal")
        if self.prefill_short not in ("cap", "error"):
            raise DataError(f"prefill_short must be 'cap' or 'error', got {self.prefill_short!r}")
        for name in ("kl_tokens", "max_new_tokens", "refusal_max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be >= 1, got {getattr(self, name)}")


def load_deep_data(harmful: str | os.PathLike | None = None, benign: str | os.PathLike | None = None,
                   limit: int | None = None, *, targets: bool = True) -> dict:
    """Harmful prompts (+ their targets when ``targets``; default AdvBench ``eval``) and held-out benign prompts
    (default ``benign:heldout``), the first ``limit`` of each."""
    if targets:
        prompts, tgts = load_targets(harmful, limit)
    else:
        prompts, tgts = load_harmful(harmful, limit), None
    return {"harmful": prompts, "targets": tgts, "benign": [p for p, _ in load_benign(benign, limit)]}


def _same_vocab(tok_a, tok_b) -> bool:
    return tok_a is tok_b or tok_a.get_vocab() == tok_b.get_vocab()


def deep_evaluate(model, tokenizer, data: dict, cfg: DeepConfig, base: dict | None = None) -> tuple[dict, dict]:
    """The deep evaluation of one checkpoint.

    Args:
        data: from :func:`load_deep_data`.
        base: the state returned for the base checkpoint (None: this checkpoint *is* the base).

    Returns:
        ``(result, state)``: ``result`` holds ``prefill``, ``framing``, ``log_odds``, ``kl`` (None for the base),
        ``direction`` (the base: its direction summary; others: the projection kept) and ``over_refusal`` (each None
        when not run), ``n_harmful``, ``n_benign`` and ``prompts`` (harmful text, for ``responses.jsonl`` only);
        ``state`` is what later checkpoints need (tokenizer; with ``depth``: the model, its direction and greedy
        reply ids).
    """
    common = dict(batch_size=cfg.batch_size, progress=cfg.progress)
    gen = dict(common, system=cfg.system, judge=cfg.judge)
    out: dict[str, Any] = {"prefill": None, "framing": None, "log_odds": None, "kl": None, "direction": None,
                           "over_refusal": None, "n_harmful": len(data["harmful"]), "n_benign": len(data["benign"]),
                           "prompts": list(data["harmful"])}  # harmful text: report.deep_json drops it
    if "prefill" in cfg.attacks:
        if data.get("targets") is None:
            raise DataError("the prefill attack needs targets: load the data with load_deep_data(targets=True)")
        out["prefill"] = prefill_attack(model, tokenizer, data["harmful"], data["targets"], cfg.ks,
                                        max_new_tokens=cfg.max_new_tokens, short=cfg.prefill_short, **gen)
    if "framing" in cfg.attacks:
        framings = load_framings() if cfg.framings is None else cfg.framings
        out["framing"] = framing_attack(model, tokenizer, data["harmful"], framings,
                                        max_new_tokens=cfg.max_new_tokens, **gen)
    if cfg.over_refusal:
        out["over_refusal"] = false_refusal_rate(model, tokenizer, data["benign"],
                                                 max_new_tokens=cfg.refusal_max_new_tokens, system=cfg.system,
                                                 **common)
    state: dict[str, Any] = {"tokenizer": tokenizer}
    if cfg.depth:
        state["model"] = model  # the reply KL of later checkpoints needs the base model itself
        out["log_odds"] = refusal_log_odds(model, tokenizer, data["harmful"], system=cfg.system, **common)
        if base is None:
            out["direction"] = refusal_direction(model, tokenizer, data["harmful"], data["benign"],
                                                 system=cfg.system, **common)
            state["direction"] = out["direction"]
            state["replies"] = generate_ids(model, tokenizer, data["harmful"], max_new_tokens=cfg.kl_tokens,
                                            system=cfg.system, desc="base replies (KL)", **common)
        else:
            out["direction"] = direction_kept(model, tokenizer, base["direction"], data["harmful"], data["benign"],
                                              system=cfg.system, **common)
            if _same_vocab(base["tokenizer"], tokenizer):
                out["kl"] = reply_kl(base["model"], model, base["tokenizer"], data["harmful"],
                                     n_tokens=cfg.kl_tokens, base_replies=base["replies"], system=cfg.system,
                                     **common)
            else:
                warnings.warn("this checkpoint's tokenizer differs from the base's; the reply KL is skipped",
                              stacklevel=2)
    return out, state


def paired_vs_base(base: dict, other: dict) -> list[dict]:
    """Exact McNemar tests of every 0/1 outcome of ``other`` against the base's (same prompts, same order)."""
    rows = []

    def add(measure: str, a, b) -> None:
        if a is not None and b is not None and len(a) == len(b):
            rows.append({"measure": measure, **mcnemar_exact(a, b)})

    if base.get("prefill") and other.get("prefill"):
        for k in other["prefill"]["per_k"]:
            if k in base["prefill"]["per_k"]:
                add(f"prefill ASR, K={k}", base["prefill"]["per_k"][k]["attack_success"],
                    other["prefill"]["per_k"][k]["attack_success"])
    if base.get("framing") and other.get("framing"):
        for fid in other["framing"]["per_framing"]:
            if fid in base["framing"]["per_framing"]:
                add(f"framing ASR, {fid}", base["framing"]["per_framing"][fid]["attack_success"],
                    other["framing"]["per_framing"][fid]["attack_success"])
        add("framing flip", base["framing"]["flip"]["flipped"], other["framing"]["flip"]["flipped"])
    if base.get("over_refusal") and other.get("over_refusal"):
        add("over-refusal", base["over_refusal"]["refused"], other["over_refusal"]["refused"])
    return rows


def deep_compare(checkpoints: Sequence, *, harmful=None, benign=None, limit: int | None = None,
                 cfg: DeepConfig | None = None, dtype=None, device: str | None = None,
                 device_map: DeviceMap | None = None) -> list[dict]:
    """:func:`deep_evaluate` on ``checkpoints`` (specs, ``(name, spec)`` or ``(name, model, tokenizer)``), the first
    being the base. Returns one ``{"name", "model", "deep": result, "paired_vs_base": [...]}`` per checkpoint."""
    cfg = cfg or DeepConfig()
    items = list(checkpoints)
    if not items:
        raise DataError("deep_compare needs at least one checkpoint (the base first)")
    data = load_deep_data(harmful, benign, limit, targets="prefill" in cfg.attacks)
    results, base_state, base_result = [], None, None
    for item in items:
        if isinstance(item, tuple) and len(item) == 3:
            name, model, tok = item
            spec = name
        else:
            name, spec = item if isinstance(item, tuple) else (str(item), item)
            model, tok = load_model(spec, dtype=dtype, device=device, device_map=device_map)
        res, state = deep_evaluate(model, tok, data, cfg, base_state)
        row = {"name": name, "model": str(spec), "deep": res, "paired_vs_base": []}
        if base_state is None:
            base_state, base_result = state, res
        else:
            row["paired_vs_base"] = paired_vs_base(base_result, res)
            del model, tok, state
        results.append(row)
        gc.collect()
    return results
