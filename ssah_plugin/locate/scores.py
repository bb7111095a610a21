"""Scores and classes: the fluctuation score per channel and unit, standardisation, the four classes, the mask.

The method (paper Eq. 1, FLAP's fluctuation metric): for unit ``j`` of a depth-2 module with output projection ``B``
(``down_proj`` / ``o_proj`` / GPT-2 ``c_proj``) and inputs ``X`` of ``B`` over the calibration tokens,

    I_j = Var_n(X[n, j]) * ||W_B[:, j]||^2        (GPT-2 Conv1D stores W transposed: row j)

computed on safety data (``I_S``) and on utility data (``I_U``). A head unit scores the sum of its channels. Scores
are standardised per unit group (z-score within each MLP / attention block, :func:`standardize`), then units are
classified on a global ranking across groups (:func:`classify`):

* SCU: highest ``z_S - z_U``; RU: lowest ``z_S + z_U``; UCU: lowest ``z_S - z_U``; CU: the rest.

Pure tensor code on the CPU in float64 (no hooks, no model calls besides reading weights).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ssah_plugin.core.hub import names_hub_repo
from ssah_plugin.core.mask import CLASS_CODES, Mask, config_hash, fingerprint_samples
from ssah_plugin.core.policies import LOCATED_DEFAULT_POLICY
from ssah_plugin.core.units import UnitGroup, find_arch_spec, unwrap_model
from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.locate.config import CLASS_ORDER, LocateConfig

__all__ = ["column_norms2", "channel_scores", "unit_scores", "layout_of", "standardize", "classify", "build_mask",
           "reclassify", "STATISTICS"]

#: recorded in ``mask.method["statistics"]``
STATISTICS = ("per-channel mean and M2 of each batch in float32 (float64 activations: float64) around a shift, "
              "merged in float64 (Chan et al.); population variance")


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


def layout_of(groups: Sequence[UnitGroup], module: str) -> str:
    """The weight layout (``"linear"`` or ``"conv1d"``) of score module ``module``."""
    return next(g.score_layout for g in groups if g.score_module == module)


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
    """Assemble the :class:`Mask`: raw and standardised scores, classes, the method parameters in ``method``
    (``method["config"] = config.method_dict()``: runtime settings are not recorded).

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
        "statistics": STATISTICS,
        "config": config.method_dict(),
    }
    name = getattr(getattr(root, "config", None), "_name_or_path", None)
    if isinstance(name, str) and names_hub_repo(name):  # a Hub id, never a local folder (it would leak its path)
        method["base_model"] = name
    method.update(method_extra or {})
    return Mask(groups=groups, architecture=model_type, model_class=type(root).__name__,
                config_hash=config_hash(root), fingerprint=fingerprint,
                scores={"safety": [t.to(torch.float64) for t in raw_safety],
                        "utility": [t.to(torch.float64) for t in raw_utility], "safety_z": sz, "utility_z": uz},
                classes=classes, default_policy=LOCATED_DEFAULT_POLICY, method=method,
                granularity=config.granularity).record_base(root, missing="skip")  # digests of the base values


def reclassify(mask: Mask, *, scu: float | None = None, ucu: float | None = None, ru: float | None = None) -> Mask:
    """Re-label ``mask`` in place with new class sizes (scores unchanged); records the sizes in ``method``."""
    cfg = dict(mask.method.get("config", {}))
    given = {"scu": scu, "ucu": ucu, "ru": ru}
    sizes = {k: cfg.get(k, getattr(LocateConfig, k)) if v is None else v for k, v in given.items()}
    order = cfg.get("class_order", list(CLASS_ORDER))
    mask.classes = classify(mask.scores["safety_z"], mask.scores["utility_z"], order=order, **sizes)
    cfg.update(sizes)
    mask.method = dict(mask.method, config=cfg)
    return mask
