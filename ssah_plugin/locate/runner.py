"""Locate safety-critical units: the entry points :func:`locate` (a model in memory) and :func:`locate_pretrained`.

A run: prepare the calibration data (:mod:`ssah_plugin.locate.inputs`), collect per-channel statistics with forward
pre-hooks (:mod:`ssah_plugin.locate.stats`; forward only, no backward), score and classify the units
(:mod:`ssah_plugin.locate.scores`), then optionally add decision units (:mod:`ssah_plugin.locate.decision`),
task-conflict units (:mod:`ssah_plugin.locate.conflict`, one backward pass per batch, weights unchanged) and
choose the class sizes by an ablation sweep (:mod:`ssah_plugin.locate.auto_sizes`).

Example:
    >>> from ssah_plugin.locate import locate, LocateConfig                               # doctest: +SKIP
    >>> mask = locate(model, tokenizer, safety="shipped:safety_refusals.jsonl",       # doctest: +SKIP
    ...               utility="shipped:benign_instructions.jsonl", config=LocateConfig(max_samples=128))
    >>> mask.save("mask.safetensors")                                                  # doctest: +SKIP

Models that do not fit in memory: :func:`locate_pretrained` on a folder runs layer by layer
(:mod:`ssah_plugin.locate.layerwise`) and gives the same scores.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ssah_plugin.core.mask import Mask
from ssah_plugin.core.units import describe_units, unwrap_model
from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.io.models import load_model, max_positions, pad_id_of, resolve_device
from ssah_plugin.locate.auto_sizes import auto_sizes
from ssah_plugin.locate.config import DEFAULT_SHIPPED_SAFETY, DEFAULT_SHIPPED_UTILITY, LocateConfig
from ssah_plugin.locate.conflict import add_conflict_units
from ssah_plugin.locate.decision import add_decision_units
from ssah_plugin.locate.inputs import prepare_data
from ssah_plugin.locate.layerwise import checkpoint_bytes, locate_layerwise, memory_available
from ssah_plugin.locate.scores import build_mask, channel_scores, layout_of, unit_scores
from ssah_plugin.locate.stats import collect_stats

__all__ = ["locate", "locate_pretrained"]

logger = logging.getLogger(__name__)


def locate(model, tokenizer, *, safety=DEFAULT_SHIPPED_SAFETY, utility=DEFAULT_SHIPPED_UTILITY,
           config: LocateConfig | None = None, task=None) -> Mask:
    """Score every unit of ``model`` on safety and utility data and classify them (SCU / UCU / CU / RU).

    Args:
        model: a transformers causal LM in memory (any device; statistics run where the model is). A path or hub
            name is passed to :func:`locate_pretrained` (which can run layer by layer).
        tokenizer: its tokenizer, with a chat template.
        safety: harmful prompts with refusals: a file, ``shipped:NAME``, a ``datasets`` name, a list of row dicts
            or of ``(prompt, response)`` tuples. With ``config.own_refusals``, prompts only (e.g. AdvBench).
        utility: benign ``(prompt, response)`` data in the same forms.
        config: :class:`LocateConfig` (defaults: 128 samples each, response tokens, paper's class sizes).
        task: optional sample of the user's training data (prompt/response rows in the same forms): adds the
            task-conflict units (:mod:`ssah_plugin.locate.conflict`). ``config.decision_units`` adds the decision
            units (:mod:`ssah_plugin.locate.decision`).

    Returns:
        A :class:`~ssah_plugin.core.mask.Mask` with ``scores`` ``safety``, ``utility``, ``safety_z``, ``utility_z``,
        ``classes`` and ``default_policy="ru-only"`` (:data:`~ssah_plugin.core.policies.LOCATED_DEFAULT_POLICY`);
        ``method["config"]`` records the method parameters (:meth:`LocateConfig.method_dict`). With the extra selections also ``decision``/``decision_z`` and
        ``conflict_dot``/``conflict_cos`` scores and the stored sets ``decision`` / ``conflict``
        (:mod:`ssah_plugin.core.selections`).
    """
    if isinstance(model, (str, os.PathLike)):
        return locate_pretrained(model, tokenizer, safety=safety, utility=utility, config=config, task=task)
    cfg = config or LocateConfig()
    root = unwrap_model(model)
    groups = describe_units(root, cfg.granularity)
    data = prepare_data(root, tokenizer, safety, utility, cfg, max_positions(root))
    info = data.info
    logger.info("locate: %d safety / %d utility examples, %d / %d counted tokens, %d units in %d groups",
                info["n_safety"], info["n_utility"], info["safety_tokens_counted"], info["utility_tokens_counted"],
                sum(g.n_units for g in groups), len(groups))
    pad = pad_id_of(tokenizer)
    raw = {}
    for what, enc in (("safety", data.safety), ("utility", data.utility)):
        col = collect_stats(root, groups, enc, batch_size=cfg.batch_size, pad_id=pad, desc=f"locate {what}",
                            progress=cfg.progress)
        per_module = {name: channel_scores(col.variance(name), root.get_submodule(name).weight,
                                           layout_of(groups, name)) for name in col.modules}
        raw[what] = [unit_scores(g, per_module[g.score_module]) for g in groups]
    mask = build_mask(root, groups, raw["safety"], raw["utility"], cfg,
                      method_extra={"data": info, "mode": "whole-model"})
    if cfg.decision_units:
        add_decision_units(root, tokenizer, mask, [p for p, _ in data.pairs["safety"]],
                           [p for p, _ in data.pairs["utility"]], cfg)
    if task is not None:
        add_conflict_units(root, tokenizer, mask, data.pairs["safety"], task, cfg)
    if cfg.auto:
        auto_sizes(root, tokenizer, mask, data.held, cfg)
    return mask


def locate_pretrained(path: str | os.PathLike, tokenizer=None, *, safety=DEFAULT_SHIPPED_SAFETY,
                      utility=DEFAULT_SHIPPED_UTILITY, config: LocateConfig | None = None, task=None) -> Mask:
    """:func:`locate` on a saved model: a local folder, a hub name, or ``tiny:<family>`` (tests, demos).

    With ``config.layerwise="auto"`` a local safetensors checkpoint that would not fit in (GPU or CPU) memory is
    processed one decoder layer at a time (:func:`ssah_plugin.locate.layerwise.locate_layerwise`): same scores,
    memory of about one layer plus the calibration activations.
    """
    cfg = config or LocateConfig()
    spec = str(path)
    device = resolve_device(cfg.device)
    mode = cfg.layerwise
    if mode == "auto":
        itemsize = getattr(torch, cfg.dtype).itemsize if cfg.dtype else (4 if device.type == "cpu" else None)
        need = checkpoint_bytes(spec, itemsize) if Path(spec).is_dir() else None
        have = memory_available(device)
        mode = "on" if need is not None and have is not None and need * 1.2 > have else "off"
        if mode == "on":
            logger.info("locate: checkpoint needs ~%.1f GiB, %.1f GiB available: running layer by layer",
                        need / 2**30, have / 2**30)
    if mode == "on" and (cfg.decision_units or task is not None):
        raise UnsupportedSetupError(
            "decision units and task-conflict units need the whole model in memory (extra forward passes over "
            "prompts; a backward pass), which layer-by-layer mode never holds"
            + ("" if cfg.layerwise == "on" else " (chosen automatically: the model looks too large for memory)")
            + "; pass --layerwise off on a machine that fits the model, or drop --decision-units / --task-data")
    if mode == "on":
        if not Path(spec).is_dir():
            raise UnsupportedSetupError(f"layer-by-layer locate needs a local folder with safetensors weights, got "
                                        f"{spec!r}; download the model first (huggingface-cli download ...)")
        return locate_layerwise(spec, tokenizer, safety=safety, utility=utility, config=cfg)

    dtype = cfg.dtype or ("float32" if device.type == "cpu" else None)
    model, tok = load_model(spec, dtype=dtype, device=str(device))
    return locate(model, tokenizer or tok, safety=safety, utility=utility, config=cfg, task=task)
