"""Locate safety-critical units: calibration statistics, importance scores, the four unit classes.

The method (paper Eq. 1, FLAP's fluctuation metric): for unit ``j`` of a depth-2 module with output projection ``B``
(``down_proj`` / ``o_proj`` / GPT-2 ``c_proj``) and inputs ``X`` of ``B`` over the calibration tokens,

    I_j = Var_n(X[n, j]) * ||W_B[:, j]||^2        (GPT-2 Conv1D stores W transposed: row j)

computed on safety data (``I_S``: harmful prompts + refusals) and on utility data (``I_U``: benign pairs). A head
unit scores the sum of its channels. Scores are standardised per unit group (z-score within each MLP / attention
block, :func:`standardize`), then units are classified on a global ranking across groups (:func:`classify`):

* SCU: highest ``z_S - z_U``; RU: lowest ``z_S + z_U``; UCU: lowest ``z_S - z_U``; CU: the rest.

Statistics are forward-only: a pre-forward hook on each ``B`` merges per-channel mean and M2 of the batch into a
running float64 state (Chan et al.'s parallel Welford update), so memory is ``O(channels)`` whatever the number of
calibration tokens. Hooks run during the forward pass only; there is no backward.

Example:
    >>> from ssah_plugin.locate.runner import locate, LocateConfig                          # doctest: +SKIP
    >>> mask = locate(model, tokenizer, safety="shipped:safety_refusals.jsonl",       # doctest: +SKIP
    ...               utility="shipped:benign_instructions.jsonl", config=LocateConfig(max_samples=128))
    >>> mask.save("mask.safetensors")                                                  # doctest: +SKIP

Models that do not fit in memory: :func:`locate_pretrained` on a folder runs layer by layer
(:mod:`ssah_plugin.locate.layerwise`) and gives the same scores.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

from ssah_plugin.core.mask import CLASS_CODES, Mask, config_hash, fingerprint_samples
from ssah_plugin.core.units import (
    UnitGroup,
    describe_units,
    find_arch_spec,
    unwrap_model,
)
from ssah_plugin.data.rows import (
    EncodedPair,
    Pair,
    encode_pairs,
    load_rows,
    pairs_from_rows,
    prompts_from_rows,
    sample_rows,
)
from ssah_plugin.errors import DataError, UnsupportedSetupError
from ssah_plugin.io.models import (
    load_model,
    max_positions,
    model_device,
    pad_id_of,
    resolve_device,
)

__all__ = [
    "LocateConfig",
    "locate",
    "locate_pretrained",
    "ChannelStats",
    "StatsCollector",
    "channel_scores",
    "unit_scores",
    "standardize",
    "classify",
    "build_mask",
    "zero_units",
    "DEFAULT_SHIPPED_SAFETY",
    "DEFAULT_SHIPPED_UTILITY",
]

logger = logging.getLogger(__name__)

DEFAULT_SHIPPED_SAFETY = "shipped:safety_refusals.jsonl"
DEFAULT_SHIPPED_UTILITY = "shipped:benign_instructions.jsonl"
CLASS_ORDER = ("SCU", "RU", "UCU")


@dataclass
class LocateConfig:
    """Every parameter of a locate run (all of them are recorded in the mask's ``method``)."""

    max_samples: int | None = field(default=128, metadata={"help": "rows drawn (seeded) from each data set; None = all"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    max_length: int | None = field(default=None, metadata={
        "help": "truncate conversations to this many tokens; None = error on sequences longer than the model allows"})
    tokens: Literal["response", "all"] = field(default="response", metadata={
        "help": "positions counted: 'response' (positions predicting a response token) or 'all' non-padding ones"})
    granularity: Literal["channel", "head"] = field(default="channel", metadata={"help": "attention unit size"})
    standardize: Literal["group", "global", "none"] = field(default="group", metadata={
        "help": "z-score scores within each unit group (default), over all units, or not at all"})
    scu: float = field(default=0.013, metadata={"help": "fraction of all units labelled SCU (paper, Llama-2-7B-Chat)"})
    ucu: float = field(default=0.133, metadata={"help": "fraction labelled UCU"})
    ru: float = field(default=0.148, metadata={"help": "fraction labelled RU"})
    class_order: tuple[str, ...] = field(default=CLASS_ORDER, metadata={
        "help": "order in which classes pick their units; a unit keeps the first class that picks it"})
    seed: int = field(default=0, metadata={"help": "seed of the row sampling"})
    own_refusals: bool = field(default=False, metadata={
        "help": "generate the model's replies to the safety prompts and keep the refusals as safety data"})
    refusal_max_new_tokens: int = field(default=64, metadata={"help": "reply length for own_refusals"})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."})
    dtype: str | None = field(default=None, metadata={
        "help": "load dtype for locate_pretrained (None: float32 on CPU, the checkpoint's dtype on GPU)"})
    layerwise: Literal["auto", "on", "off"] = field(default="auto", metadata={
        "help": "locate_pretrained: run one decoder layer at a time ('auto': when the model would not fit)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    # column overrides (None = auto-detect)
    safety_prompt_field: str | None = None
    safety_response_field: str | None = None
    utility_prompt_field: str | None = None
    utility_response_field: str | None = None
    utility_input_field: str | None = None
    # automatic sizes (ablation sweep on held-apart data)
    auto: bool = field(default=False, metadata={"help": "choose SCU and RU sizes by an ablation sweep"})
    auto_holdout: int = field(default=32, metadata={"help": "rows of each data set held apart for the sweep"})
    auto_scu_grid: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.013, 0.02, 0.03, 0.05)
    auto_ru_grid: tuple[float, ...] = (0.05, 0.1, 0.148, 0.2, 0.25, 0.3)
    auto_refusal_drop: float = field(default=0.5, metadata={
        "help": "SCU: smallest size whose removal lowers the held-apart refusal rate by at least this (absolute)"})
    auto_utility_tolerance: float = field(default=0.05, metadata={
        "help": "relative rise of the held-apart benign loss allowed (SCU and RU)"})
    auto_ru_refusal_tolerance: float = field(default=0.05, metadata={
        "help": "RU: largest size whose removal lowers the refusal rate by at most this (absolute)"})
    auto_max_new_tokens: int = field(default=48, metadata={"help": "reply length in the sweep"})
    # extra unit selections (ssah_plugin.core.selections; docs/locate.md "Decision and task-conflict units")
    decision_units: bool = field(default=False, metadata={
        "help": "score decision units: harmful vs benign separation at the last prompt token"})
    decision_fraction: float = field(default=0.05, metadata={
        "help": "fraction of all units in the stored 'decision' set"})
    decision_weight: Literal["norm", "none"] = field(default="norm", metadata={
        "help": "decision score: Cohen's d times ||W[:, j]|| ('norm') or d alone ('none')"})
    conflict_fraction: float = field(default=0.05, metadata={
        "help": "fraction of all units in the stored 'conflict' set (with task data)"})
    task_max_samples: int | None = field(default=128, metadata={"help": "task rows drawn (seeded); None = all"})
    task_prompt_field: str | None = None
    task_response_field: str | None = None
    task_input_field: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_samples is not None and self.max_samples < 1:
            problems.append(f"max_samples must be >= 1 or None, got {self.max_samples}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            problems.append(f"max_length must be >= 2, got {self.max_length}")
        if self.tokens not in ("response", "all"):
            problems.append(f"tokens must be 'response' or 'all', got {self.tokens!r}")
        if self.granularity not in ("channel", "head"):
            problems.append(f"granularity must be 'channel' or 'head', got {self.granularity!r}")
        if self.standardize not in ("group", "global", "none"):
            problems.append(f"standardize must be 'group', 'global' or 'none', got {self.standardize!r}")
        for name in ("scu", "ucu", "ru"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name} must be a fraction in [0, 1], got {v}")
        if self.scu + self.ucu + self.ru > 1.0 + 1e-9:
            problems.append(f"scu + ucu + ru = {self.scu + self.ucu + self.ru:.3f} exceeds 1")
        self.class_order = tuple(self.class_order)
        if sorted(self.class_order) != sorted(CLASS_ORDER):
            problems.append(f"class_order must be a permutation of {CLASS_ORDER}, got {self.class_order}")
        if self.layerwise not in ("auto", "on", "off"):
            problems.append(f"layerwise must be 'auto', 'on' or 'off', got {self.layerwise!r}")
        if self.auto_holdout < 1:
            problems.append(f"auto_holdout must be >= 1, got {self.auto_holdout}")
        from ssah_plugin.core.selections import selection_config_problems

        problems += selection_config_problems(self)
        if problems:
            raise ValueError("invalid LocateConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# ================================================================================================ statistics
class ChannelStats:
    """Running per-channel mean and variance in float64 (Chan et al. parallel update of Welford's M2).

    Each :meth:`update` merges a whole batch ``[n, d]``: the batch mean and M2 are computed in float64 by
    ``torch.var_mean`` (around the batch mean: no catastrophic cancellation as with raw sum-of-squares), then merged.
    State is ``3 x d`` numbers.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        nb = int(x.shape[0])
        if nb == 0:
            return
        if self.mean.device != x.device:
            self.mean, self.m2 = self.mean.to(x.device), self.m2.to(x.device)
        var_b, mb = torch.var_mean(x.to(torch.float64), 0, correction=0)  # one fused pass
        m2b = var_b * nb
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2b + delta.square() * (self.n * nb / n)
        self.n = n

    def variance(self) -> torch.Tensor:
        """Population variance (divide by N) on the CPU; zeros if nothing was counted."""
        if self.n == 0:
            return torch.zeros_like(self.m2, device="cpu")
        return (self.m2 / self.n).cpu()


class StatsCollector:
    """Forward pre-hooks on each group's output projection ``B`` that feed :class:`ChannelStats`.

    Set :attr:`select` (bool ``[batch * seq]``, True = count this position) before each forward pass; the hook runs
    when ``B`` is called, i.e. during the forward, before ``B`` computes its output. Use as a context manager.
    """

    def __init__(self, root: nn.Module, groups: Sequence[UnitGroup]) -> None:
        self.root = root
        self.modules: dict[str, nn.Module] = {}
        for g in groups:
            if g.score_module not in self.modules:
                self.modules[g.score_module] = root.get_submodule(g.score_module)
        self.stats: dict[str, ChannelStats] = {}
        self.select: torch.Tensor | None = None
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            x = x.reshape(-1, x.shape[-1])
            if self.select is not None:
                x = x[self.select]
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = ChannelStats(x.shape[-1], x.device)
            st.update(x.detach())

        return hook

    def __enter__(self) -> "StatsCollector":
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def variance(self, module_name: str) -> torch.Tensor:
        st = self.stats.get(module_name)
        if st is None or st.n == 0:
            raise DataError(f"no calibration token reached {module_name}; the calibration data is empty after "
                            "masking (check --tokens and --max-length)")
        return st.variance()


def batches(encoded: Sequence[EncodedPair], batch_size: int, pad_id: int,
            device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded batches ``(input_ids, attention_mask, count)`` in a fixed order (longest first, stable).

    Padding positions are never counted (``count`` is False there); with causal attention and right padding the
    real positions are unaffected by padding.
    """
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        cnt = torch.zeros((len(chunk), width), dtype=torch.bool)
        for r, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[r, :n] = torch.tensor(e.input_ids)
            att[r, :n] = 1
            cnt[r, :n] = torch.tensor(e.count)
        yield ids.to(device), att.to(device), cnt.to(device)


def n_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


@torch.no_grad()
def collect_stats(model: nn.Module, groups: Sequence[UnitGroup], encoded: Sequence[EncodedPair], *,
                  batch_size: int, pad_id: int, desc: str = "calibration", progress: bool = True) -> StatsCollector:
    """Run the decoder stack (no LM head) over ``encoded`` and return the filled collector."""
    root = unwrap_model(model)
    body = getattr(root, "base_model", root)  # the decoder without lm_head: its logits are never needed
    device = model_device(root)
    was_training = root.training
    root.eval()
    collector = StatsCollector(root, groups)
    try:
        with collector:
            for ids, att, cnt in _progress(batches(encoded, batch_size, pad_id, device),
                                           n_batches(len(encoded), batch_size), desc, progress):
                collector.select = cnt.reshape(-1)
                body(input_ids=ids, attention_mask=att, use_cache=False)
    finally:
        root.train(was_training)
    return collector


# ================================================================================================ scores
def column_norms2(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """``||W[:, j]||^2`` per input channel j of ``B`` (float64, CPU); Conv1D weights are ``[in, out]``: row j."""
    w = weight.detach().to(torch.float64)
    return (w.square().sum(0) if layout == "linear" else w.square().sum(1)).cpu()


def channel_scores(variance: torch.Tensor, weight: torch.Tensor, layout: str) -> torch.Tensor:
    """``I_j = Var(X_j) * ||W[:, j]||^2`` per input channel of ``B`` (float64)."""
    return variance.to(torch.float64).cpu() * column_norms2(weight, layout)


def _score_index(group: UnitGroup) -> torch.Tensor:
    for s in group.slices:
        if s.module == group.score_module and s.role == "in":
            return s.index
    raise UnsupportedSetupError(f"group {group.name} has no input slice of its score module {group.score_module}")


def unit_scores(group: UnitGroup, per_channel: torch.Tensor) -> torch.Tensor:
    """Per-unit scores: a unit scores the sum of its channels (one channel, or the head_dim channels of a head)."""
    return per_channel[_score_index(group)].sum(1)


def standardize(per_group: Sequence[torch.Tensor], mode: str = "group") -> list[torch.Tensor]:
    """z-scores ``(x - mean) / std`` (population std) within each group (``"group"``), over all units
    (``"global"``), or a copy (``"none"``). A constant group gets zeros."""
    if mode == "none":
        return [t.clone().to(torch.float64) for t in per_group]
    if mode == "global":
        flat = torch.cat([t.to(torch.float64) for t in per_group])
        z = _z(flat)
        return list(torch.split(z, [t.numel() for t in per_group]))
    if mode == "group":
        return [_z(t.to(torch.float64)) for t in per_group]
    raise ValueError(f"standardize must be 'group', 'global' or 'none', got {mode!r}")


def _z(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return x.clone()
    std = x.std(unbiased=False)
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def classify(safety_z: Sequence[torch.Tensor], utility_z: Sequence[torch.Tensor], *, scu: float, ucu: float,
             ru: float, order: Sequence[str] = CLASS_ORDER) -> list[torch.Tensor]:
    """Class codes (uint8, :data:`ssah_plugin.core.mask.CLASS_NAMES`) per group from standardised scores.

    Sizes are fractions of all units (``round(f * N)`` units each). Classes pick their units in ``order`` (default
    SCU, RU, UCU) from the units no earlier class took, on one global ranking across groups:

    * SCU: highest ``z_S - z_U``;  RU: lowest ``z_S + z_U``;  UCU: lowest ``z_S - z_U``;  CU: everything left.

    Ties are broken by position (group order, then unit index), so the result is deterministic.
    """
    s = torch.cat([t.to(torch.float64) for t in safety_z])
    u = torch.cat([t.to(torch.float64) for t in utility_z])
    n = s.numel()
    codes = torch.full((n,), CLASS_CODES["CU"], dtype=torch.uint8)
    taken = torch.zeros(n, dtype=torch.bool)
    key = {"SCU": -(s - u), "UCU": s - u, "RU": s + u}  # ascending key: first = most typical of the class
    size = {"SCU": scu, "UCU": ucu, "RU": ru}
    for name in order:
        k = min(int(round(size[name] * n)), int((~taken).sum()))
        if k <= 0:
            continue
        cand = torch.nonzero(~taken).squeeze(1)
        pick = cand[torch.argsort(key[name][cand], stable=True)[:k]]
        codes[pick] = CLASS_CODES[name]
        taken[pick] = True
    return list(torch.split(codes, [t.numel() for t in safety_z]))


def build_mask(model: nn.Module, groups: list[UnitGroup], raw_safety: list[torch.Tensor],
               raw_utility: list[torch.Tensor], config: LocateConfig, *,
               fingerprint: dict[str, torch.Tensor] | None = None, method_extra: dict | None = None) -> Mask:
    """Assemble the :class:`Mask`: raw and standardised scores, classes, every parameter in ``method``.

    ``model`` may live on the meta device (layer-by-layer mode) when ``fingerprint`` is given.
    """
    root = unwrap_model(model)
    model_type, _ = find_arch_spec(root)
    if fingerprint is None:
        params = dict(root.named_parameters())
        fingerprint = {}
        for g in groups:
            for s in g.slices:
                if s.name not in fingerprint and s.name in params:
                    fingerprint[s.name] = fingerprint_samples(params[s.name])
    sz, uz = standardize(raw_safety, config.standardize), standardize(raw_utility, config.standardize)
    classes = classify(sz, uz, scu=config.scu, ucu=config.ucu, ru=config.ru, order=config.class_order)
    method = {
        "name": "ssah-locate",
        "score": "var(X_j) * ||W[:, j]||^2 (FLAP fluctuation, paper Eq. 1)",
        "standardize": config.standardize,
        "classify": {"SCU": "highest z_S - z_U", "RU": "lowest z_S + z_U", "UCU": "lowest z_S - z_U",
                     "CU": "rest", "order": list(config.class_order), "scope": "global ranking across groups"},
        "config": config.to_dict(),
    }
    method.update(method_extra or {})
    return Mask(groups=groups, architecture=model_type, model_class=type(root).__name__,
                config_hash=config_hash(root), fingerprint=fingerprint,
                scores={"safety": [t.to(torch.float64) for t in raw_safety],
                        "utility": [t.to(torch.float64) for t in raw_utility], "safety_z": sz, "utility_z": uz},
                classes=classes, default_policy="scu+cu6", method=method,
                granularity=config.granularity).record_base(root, missing="skip")  # digests of the base values


def reclassify(mask: Mask, *, scu: float | None = None, ucu: float | None = None, ru: float | None = None) -> Mask:
    """Re-label ``mask`` in place with new class sizes (scores unchanged); records the sizes in ``method``."""
    cfg = dict(mask.method.get("config", {}))
    sizes = {"scu": cfg.get("scu", 0.013) if scu is None else scu, "ucu": cfg.get("ucu", 0.133) if ucu is None else ucu,
             "ru": cfg.get("ru", 0.148) if ru is None else ru}
    order = cfg.get("class_order", list(CLASS_ORDER))
    mask.classes = classify(mask.scores["safety_z"], mask.scores["utility_z"], order=order, **sizes)
    cfg.update(sizes)
    mask.method = dict(mask.method, config=cfg)
    return mask


# ================================================================================================ data
def _as_pairs(source, *, what: str, prompt_field, response_field, input_field, max_samples, seed) -> list[Pair]:
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], tuple):
        return list(source) if max_samples is None else list(source)[:max_samples]
    rows = sample_rows(load_rows(source), max_samples, seed)
    return pairs_from_rows(rows, prompt_field=prompt_field, response_field=response_field, input_field=input_field,
                           where=f"{what} data")


def own_refusals(model, tokenizer, prompts: Sequence[Any], *, max_new_tokens: int = 64, batch_size: int = 8,
                 progress: bool = True) -> list[Pair]:
    """The model's own greedy replies to harmful ``prompts``, kept where the keyword judge finds a refusal phrase.

    Uses :func:`ssah_plugin.evaluation.generation.generate` and :class:`ssah_plugin.evaluation.judge.RefusalJudge` (phrase match only,
    the 20-word rule is off: a short refusal is still a refusal, a short non-answer is not). Raises
    :class:`DataError` if no reply is a refusal. Replies are never logged.
    """
    from ssah_plugin.evaluation.generation import generate
    from ssah_plugin.evaluation.judge import RefusalJudge

    judge = RefusalJudge(min_words=0)
    replies = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=progress)
    kept = [(p, r) for p, r in zip(prompts, replies) if judge.is_refusal(r)]
    logger.info("own refusals: %d of %d replies are refusals", len(kept), len(replies))
    if not kept:
        raise DataError(
            f"own refusals: none of the model's {len(replies)} replies to the safety prompts contains a refusal "
            "phrase, so there is no safety calibration data. The model may not be safety-aligned, or it refuses in "
            "words the judge does not know: pass a safety file with refusals (prompt/response rows) instead"
        )
    return kept


def _safety_pairs(model, tokenizer, source, cfg: LocateConfig, max_samples: int | None) -> list[Pair]:
    if not cfg.own_refusals:
        return _as_pairs(source, what="safety", prompt_field=cfg.safety_prompt_field,
                         response_field=cfg.safety_response_field, input_field=None, max_samples=max_samples,
                         seed=cfg.seed)
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], str):
        prompts = list(source)[:max_samples] if max_samples else list(source)
    else:
        rows = load_rows(source)
        if any(r.get("split") == "eval" for r in rows):  # AdvBench: never calibrate on the evaluation prompts
            rows = [r for r in rows if r.get("split") != "eval"]
            logger.info("own refusals: skipping AdvBench rows with split 'eval' (%d rows left)", len(rows))
            if not rows:
                raise DataError("the safety data holds only AdvBench 'eval' rows, which are kept for evaluation; "
                                "use the 'calib' rows")
        # one row per distinct prompt (safety_refusals.jsonl repeats prompts)
        seen, uniq = set(), []
        for r in rows:
            key = r.get(cfg.safety_prompt_field or "prompt", id(r))
            if key not in seen:
                seen.add(key)
                uniq.append(r)
        prompts = prompts_from_rows(sample_rows(uniq, max_samples, cfg.seed), prompt_field=cfg.safety_prompt_field,
                                    where="safety data")
    return own_refusals(model, tokenizer, prompts, max_new_tokens=cfg.refusal_max_new_tokens,
                        batch_size=cfg.batch_size, progress=cfg.progress)


def prepare_data(model, tokenizer, safety, utility, cfg: LocateConfig,
                 max_pos: int | None) -> tuple[list[EncodedPair], list[EncodedPair], dict]:
    """Load, sample and tokenise both data sets; returns the encoded sets and counts for ``method``."""
    extra = cfg.auto_holdout if cfg.auto else 0
    n = None if cfg.max_samples is None else cfg.max_samples + extra
    s_pairs = _safety_pairs(model, tokenizer, safety, cfg, n)
    u_pairs = _as_pairs(utility, what="utility", prompt_field=cfg.utility_prompt_field,
                        response_field=cfg.utility_response_field, input_field=cfg.utility_input_field,
                        max_samples=n, seed=cfg.seed)
    held: dict = {}
    if cfg.auto:
        for name, pairs in (("safety", s_pairs), ("utility", u_pairs)):
            if len(pairs) < cfg.auto_holdout + 1:
                raise DataError(f"auto mode holds {cfg.auto_holdout} {name} rows apart but the data has only "
                                f"{len(pairs)}; give more rows or lower auto_holdout")
        held = {"safety": s_pairs[-cfg.auto_holdout:], "utility": u_pairs[-cfg.auto_holdout:]}
        s_pairs, u_pairs = s_pairs[:-cfg.auto_holdout], u_pairs[:-cfg.auto_holdout]
    held["calibration"] = {"safety": s_pairs, "utility": u_pairs}  # for locate_decision / locate_conflict
    enc_s = encode_pairs(tokenizer, s_pairs, tokens=cfg.tokens, max_length=cfg.max_length, max_positions=max_pos,
                         where="safety data")
    enc_u = encode_pairs(tokenizer, u_pairs, tokens=cfg.tokens, max_length=cfg.max_length, max_positions=max_pos,
                         where="utility data")
    info = {"n_safety": len(enc_s), "n_utility": len(enc_u),
            "safety_tokens_counted": sum(sum(e.count) for e in enc_s),
            "utility_tokens_counted": sum(sum(e.count) for e in enc_u),
            "safety_source": _source_name(safety), "utility_source": _source_name(utility)}
    return enc_s, enc_u, {"data": info, "_held": held}


def _source_name(source) -> str:
    return f"<{len(source)} in-memory rows>" if isinstance(source, (list, tuple)) else str(source)


# ================================================================================================ entry points
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
        ``classes`` and ``default_policy="scu+cu6"``; ``method`` records every parameter. With the extra
        selections also ``decision``/``decision_z`` and ``conflict_dot``/``conflict_cos`` scores and the stored
        sets ``decision`` / ``conflict`` (:mod:`ssah_plugin.core.selections`).
    """
    if isinstance(model, (str, os.PathLike)):
        return locate_pretrained(model, tokenizer, safety=safety, utility=utility, config=config, task=task)
    cfg = config or LocateConfig()
    root = unwrap_model(model)
    groups = describe_units(root, cfg.granularity)
    enc_s, enc_u, info = prepare_data(root, tokenizer, safety, utility, cfg, max_positions(root))
    held = info.pop("_held")
    logger.info("locate: %d safety / %d utility examples, %d / %d counted tokens, %d units in %d groups",
                info["data"]["n_safety"], info["data"]["n_utility"], info["data"]["safety_tokens_counted"],
                info["data"]["utility_tokens_counted"], sum(g.n_units for g in groups), len(groups))
    pad = pad_id_of(tokenizer)
    raw = {}
    for what, enc in (("safety", enc_s), ("utility", enc_u)):
        col = collect_stats(root, groups, enc, batch_size=cfg.batch_size, pad_id=pad, desc=f"locate {what}",
                            progress=cfg.progress)
        per_module = {name: channel_scores(col.variance(name), root.get_submodule(name).weight,
                                           _layout_of(groups, name)) for name in col.modules}
        raw[what] = [unit_scores(g, per_module[g.score_module]) for g in groups]
    mask = build_mask(root, groups, raw["safety"], raw["utility"], cfg, method_extra=dict(info, mode="whole-model"))
    calib = held.pop("calibration")
    if cfg.decision_units:
        from ssah_plugin.locate.decision import add_decision_units

        add_decision_units(root, tokenizer, mask, [p for p, _ in calib["safety"]], [p for p, _ in calib["utility"]],
                           cfg)
    if task is not None:
        from ssah_plugin.locate.conflict import add_conflict_units

        add_conflict_units(root, tokenizer, mask, calib["safety"], task, cfg)
    if cfg.auto:
        auto_sizes(root, tokenizer, mask, held, cfg)
    return mask


def _layout_of(groups: Sequence[UnitGroup], module: str) -> str:
    return next(g.score_layout for g in groups if g.score_module == module)


def locate_pretrained(path: str | os.PathLike, tokenizer=None, *, safety=DEFAULT_SHIPPED_SAFETY,
                      utility=DEFAULT_SHIPPED_UTILITY, config: LocateConfig | None = None, task=None) -> Mask:
    """:func:`locate` on a saved model: a local folder, a hub name, or ``tiny:<family>`` (tests, demos).

    With ``config.layerwise="auto"`` a local safetensors checkpoint that would not fit in (GPU or CPU) memory is
    processed one decoder layer at a time (:func:`ssah_plugin.locate.layerwise.locate_layerwise`): same scores, memory of
    about one layer plus the calibration activations.
    """
    from ssah_plugin.locate.layerwise import (
        checkpoint_bytes,
        locate_layerwise,
        memory_available,
    )

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


# ================================================================================================ ablation
def _class_selection(mask: Mask, classes: Sequence[str]) -> list[torch.Tensor]:
    if mask.classes is None:
        raise DataError("this mask has no unit classes; create it with `ssah-plugin locate`")
    codes = [CLASS_CODES[c] for c in classes]
    return [torch.isin(c.to(torch.int64), torch.tensor(codes)) for c in mask.classes]


def zero_units(model: nn.Module, mask: Mask, selected: Sequence[torch.Tensor] | Sequence[str], *,
               output_only: bool = False, keep: bool = False) -> list[tuple]:
    """Set the weight slices of the selected units to zero, in place (pruning; no gradient involved).

    Args:
        selected: per-group boolean tensors, or class names (``["SCU"]``).
        output_only: zero only the unit's input channel of ``B`` (column of ``down_proj`` / ``o_proj``), which
            removes exactly that unit's contribution; by default every slice the mask lists is zeroed (with
            grouped-query attention, an attention unit's value row is shared with other heads' units).
        keep: return ``(param, axis, index, saved_values)`` tuples so :func:`restore_units` can undo the change.

    Resolution is :func:`ssah_plugin.core.plan.plan_frozen_slices` on a copy of the mask whose only stored set is
    the selection, so exactly the slices freezing would protect are touched.
    """
    from ssah_plugin.core.plan import plan_frozen_slices

    if selected and isinstance(selected[0], str):
        selected = _class_selection(mask, selected)  # type: ignore[arg-type]
    tmp = dataclasses.replace(mask, stored={"_ablate": [s.bool() for s in selected]}, default_policy="_ablate")
    if output_only:
        tmp.groups = [dataclasses.replace(g, slices=[s for s in g.slices if s.module == g.score_module
                                                     and s.role == "in"]) for g in mask.groups]
    saved = []
    with torch.no_grad():
        for fs in plan_frozen_slices(tmp, model, "_ablate"):
            if keep:
                saved.append((fs.param, fs.axis, fs.index, fs.param.index_select(fs.axis, fs.index).clone()))
            fs.param.index_fill_(fs.axis, fs.index, 0.0)
    return saved


def restore_units(saved: Sequence[tuple]) -> None:
    """Undo :func:`zero_units` (``keep=True``) bit-exactly."""
    with torch.no_grad():
        for param, axis, index, values in saved:
            param.index_copy_(axis, index, values)


def ablated_copy(model: nn.Module, mask: Mask, classes: Sequence[str], *, output_only: bool = False) -> nn.Module:
    """A deep copy of ``model`` with the units of ``classes`` zeroed (the original is untouched)."""
    import copy

    clone = copy.deepcopy(model)
    zero_units(clone, mask, list(classes), output_only=output_only)
    return clone


def ablation_study(model, tokenizer, mask: Mask, classes: Sequence[str], harmful: Sequence[Any],
                   benign: Sequence[Pair], *, max_new_tokens: int = 64, batch_size: int = 8,
                   output_only: bool = False, system: str | None = None, progress: bool = True) -> list[dict]:
    """The paper's Table 1 on ``model``: refusal / attack success rate on ``harmful`` prompts and benign loss on
    ``benign`` pairs for the dense model and with each class in ``classes`` removed (one at a time).

    Units are zeroed in place and restored bit-exactly after each row, so only one copy of the model is needed.
    """
    from ssah_plugin.evaluation.evaluate import attack_success_rate, benign_loss

    def row(name: str, units: int) -> dict:
        asr = attack_success_rate(model, tokenizer, harmful, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  system=system, progress=progress)
        loss = benign_loss(model, tokenizer, benign, batch_size=batch_size, system=system, progress=progress)
        return {"model": name, "units_removed": units, "fraction_removed": units / max(mask.n_units, 1),
                "asr": asr["asr"], "refusal_rate": asr["refusal_rate"], "n_harmful": asr["n"],
                "benign_loss": loss["loss"], "benign_perplexity": loss["perplexity"], "n_benign": loss["n"]}

    rows = [row("dense", 0)]
    for cls in classes:
        sel = _class_selection(mask, [cls])
        saved = zero_units(model, mask, sel, output_only=output_only, keep=True)
        try:
            rows.append(row(f"-{cls}", int(sum(int(s.sum()) for s in sel))))
        finally:
            restore_units(saved)
    return rows


# ================================================================================================ auto mode
def measure(model, tokenizer, held: dict, cfg: LocateConfig) -> dict:
    """Refusal rate (greedy replies, keyword judge of Wei et al.) on held-apart harmful prompts and mean benign
    response loss on held-apart utility pairs."""
    from ssah_plugin.evaluation.evaluate import benign_loss
    from ssah_plugin.evaluation.generation import generate
    from ssah_plugin.evaluation.judge import RefusalJudge

    judge = RefusalJudge()
    prompts = [p for p, _ in held["safety"]]
    replies = generate(model, tokenizer, prompts, max_new_tokens=cfg.auto_max_new_tokens,
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
    import warnings

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


__all__ += ["ablated_copy", "ablation_study", "measure", "choose_sizes", "auto_sizes", "reclassify", "restore_units", "own_refusals", "resolve_device", "collect_stats", "batches"]
