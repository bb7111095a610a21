"""Plots (matplotlib, Agg backend): where the unit classes sit across layers (``ssah-plugin inspect --plot``), the
ASR / benign-loss bars of ``ssah-plugin eval`` (:func:`plot_results`) and the deep safety evaluation figure
(``ssah-plugin eval --deep``: :func:`plot_deep`).

matplotlib is the ``[plot]`` extra (``pip install 'ssah-plugin[plot]'``): it is imported only when a figure is drawn,
and a missing install raises :class:`~ssah_plugin.errors.MissingExtraError` naming the extra.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ssah_plugin.core.mask import CLASS_CODES, Mask
from ssah_plugin.errors import require

__all__ = ["class_table", "plot_classes", "plot_results", "plot_deep", "CLASS_COLORS"]

#: class -> colour (colour-blind safe Okabe-Ito palette)
CLASS_COLORS = {"SCU": "#D55E00", "UCU": "#0072B2", "CU": "#BBBBBB", "RU": "#009E73"}
_ORDER = ("SCU", "UCU", "CU", "RU")


def _pyplot(purpose: str):
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), or :class:`MissingExtraError`."""
    matplotlib = require("matplotlib", "plot", purpose)
    matplotlib.use("Agg", force=False)
    return require("matplotlib.pyplot", "plot", purpose)


def class_table(mask: Mask) -> dict[str, dict[int, dict[str, int]]]:
    """``{kind: {layer: {class: count}}}`` for a classified mask."""
    if mask.classes is None:
        raise ValueError("this mask has no unit classes (it was not made by locate)")
    out: dict[str, dict[int, dict[str, int]]] = {}
    for g, c in zip(mask.groups, mask.classes):
        row = out.setdefault(g.kind, {}).setdefault(g.layer, {k: 0 for k in _ORDER})
        c = c.to(torch.int64)
        for name in _ORDER:
            row[name] += int((c == CLASS_CODES[name]).sum())
    return out


def plot_classes(mask: Mask, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write a PNG: per layer, the share of each class among MLP units (top) and attention units (bottom), plus
    the SCU count per layer (right axis markers), so the reader sees where safety-critical units concentrate."""
    table = class_table(mask)
    plt = _pyplot("plotting the unit classes (inspect --plot)")
    from matplotlib.ticker import MaxNLocator

    kinds = [k for k in ("mlp", "attn") if k in table]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(6.0, 0.28 * _n_layers(table) + 3), 2.8 * len(kinds) + 0.9),
                             sharex=True, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        layers = sorted(table[kind])
        totals = [max(sum(table[kind][li].values()), 1) for li in layers]
        bottom = [0.0] * len(layers)
        for name in _ORDER:
            share = [100.0 * table[kind][li][name] / t for li, t in zip(layers, totals)]
            ax.bar(layers, share, bottom=bottom, color=CLASS_COLORS[name], width=0.85,
                   label=f"{name} ({sum(table[kind][li][name] for li in layers)})", edgecolor="none")
            bottom = [b + s for b, s in zip(bottom, share)]
        ax.set_ylim(0, 100)
        ax.set_ylabel("% of units")
        unit = "heads" if kind == "attn" and mask.granularity == "head" else ("channels" if kind == "attn" else
                                                                              "neurons")
        ax.set_title(f"{'MLP' if kind == 'mlp' else 'attention'} {unit} ({totals[0]} per layer)", fontsize=10,
                     loc="left")
        scu = [table[kind][li]["SCU"] for li in layers]
        twin = ax.twinx()
        twin.plot(layers, scu, color="black", marker="o", markersize=3, linewidth=1, label="SCU count (right axis)")
        twin.set_ylabel("SCU count", fontsize=8)
        twin.set_ylim(0, max(scu + [1]) * 1.15)
        twin.yaxis.set_major_locator(MaxNLocator(integer=True))
        twin.tick_params(labelsize=8)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.07, 1.0), fontsize=8, frameon=False,
                  title="class (units)", title_fontsize=8)
    axes[-1, 0].set_xlabel("layer")
    layers_all = sorted({li for k in kinds for li in table[k]})
    step = max(1, len(layers_all) // 16)
    axes[-1, 0].set_xticks(layers_all[::step])
    s = mask.summary()
    fig.suptitle(title or f"{mask.architecture} ({mask.model_class}): {s['units']} units; "
                          + ", ".join(f"{k} {s['classes'][k]}" for k in _ORDER), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _n_layers(table: dict) -> int:
    return len({li for rows in table.values() for li in rows})


# ---------------------------------------------------------------------------------------------------- deep eval
def _err(rate: float, ci) -> list[list[float]]:
    lo, hi = ci
    return [[100.0 * max(rate - lo, 0.0)], [100.0 * max(hi - rate, 0.0)]]


def _short(name: str) -> str:
    return name if len(name) <= 24 else "..." + name[-21:]


def _not_run(ax, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_results(results: Sequence[dict], path: str | os.PathLike) -> Path:
    """Two bar panels, one bar per checkpoint: attack success rate (%) and benign loss."""
    plt = _pyplot("drawing the eval chart (eval.png)")
    names = [r["name"] for r in results]
    asr = [float("nan") if r.get("asr") is None else 100.0 * r["asr"] for r in results]
    loss = [float("nan") if r.get("benign_loss") is None else r["benign_loss"] for r in results]
    width = max(6.0, 1.3 * len(names) + 3.0)
    fig, axes = plt.subplots(1, 2, figsize=(width, 3.8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, values, title, fmt in ((axes[0], asr, "attack success rate (%), lower is safer", "{:.1f}"),
                                   (axes[1], loss, "benign loss (NLL), lower is better", "{:.3f}")):
        xs = range(len(names))
        bars = ax.bar(xs, [0 if math.isnan(v) else v for v in values],
                      color=[colors[i % len(colors)] for i in xs])
        for bar, v in zip(bars, values):
            label = "n/a" if math.isnan(v) else fmt.format(v)
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([n if len(n) <= 24 else "..." + n[-21:] for n in names], rotation=20, ha="right",
                           fontsize=8)
        ax.set_title(title, fontsize=10)
        finite = [v for v in values if not math.isnan(v)]
        if title.startswith("attack"):
            ax.set_ylim(0, min(100.0, max(10.0, max(finite, default=0.0) * 1.2)))
        elif finite:
            ax.set_ylim(0, max(finite) * 1.15)
    n_h = max((r.get("n_harmful", 0) for r in results), default=0)
    n_b = max((r.get("n_benign", 0) for r in results), default=0)
    fig.suptitle(f"ssah-plugin eval: {n_h} harmful prompts, {n_b} benign pairs", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_deep(results: list[dict], path: str | os.PathLike) -> Path:
    """One PNG with six panels: prefill ASR vs K, ASR per framing (flip rate in the legend), over-refusal, refusal
    log-odds, per-position reply KL to the base, and the refusal-direction gap kept per layer. Rates show 95%
    Wilson intervals; every panel title gives the number of prompts."""
    plt = _pyplot("drawing the deep evaluation figure (deep.png)")
    from matplotlib.ticker import MaxNLocator

    rows = [(r["name"], r["deep"]) for r in results if r.get("deep")]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    (a_pre, a_fr, a_or), (a_lo, a_kl, a_dir) = axes
    pre = [(n, d["prefill"]) for n, d in rows if d.get("prefill")]
    if pre:
        ks = [str(k) for k in pre[0][1]["ks"]]
        for j, (name, d) in enumerate(pre):
            xs = [i for i, k in enumerate(ks) if k in d["per_k"]]
            for i in xs:
                v = d["per_k"][ks[i]]
                a_pre.errorbar(i + 0.06 * j, 100 * v["asr"], yerr=_err(v["asr"], v["wilson95"]), fmt="o",
                               color=colors[j % len(colors)], capsize=3, markersize=4)
            a_pre.plot([i + 0.06 * j for i in xs], [100 * d["per_k"][ks[i]]["asr"] for i in xs],
                       color=colors[j % len(colors)], label=_short(name))
        a_pre.set_xticks(range(len(ks)))
        a_pre.set_xticklabels(ks)
        a_pre.set_xlabel("prefilled target tokens K")
        a_pre.set_ylabel("ASR (%)")
        a_pre.set_ylim(0, 100)
        a_pre.legend(fontsize=7)
        a_pre.set_title(f"prefill attack, n={pre[0][1]['per_k'][ks[0]]['n']} prompts", fontsize=9)
    else:
        _not_run(a_pre, "prefill attack")
    fr = [(n, d["framing"]) for n, d in rows if d.get("framing")]
    if fr:
        ids = fr[0][1]["framings"]
        w = 0.8 / len(fr)
        for j, (name, d) in enumerate(fr):
            for i, fid in enumerate(ids):
                v = d["per_framing"][fid]
                a_fr.bar(i + j * w - 0.4 + w / 2, 100 * v["asr"], w, yerr=_err(v["asr"], v["wilson95"]),
                         color=colors[j % len(colors)], capsize=2,
                         label=f"{_short(name)} (flip {100 * d['flip']['flip_rate']:.0f}%)" if i == 0 else None)
        a_fr.set_xticks(range(len(ids)))
        a_fr.set_xticklabels(ids, rotation=30, ha="right", fontsize=8)
        a_fr.set_ylabel("ASR (%)")
        a_fr.set_ylim(0, 100)
        a_fr.legend(fontsize=7)
        a_fr.set_title(f"motive framing, n={fr[0][1]['flip']['n']} prompts per framing", fontsize=9)
    else:
        _not_run(a_fr, "motive framing")
    _bars(a_or, [(n, d["over_refusal"]) for n, d in rows if d.get("over_refusal")], colors)
    lo = [(n, d["log_odds"]) for n, d in rows if d.get("log_odds")]
    if lo:
        for j, (name, d) in enumerate(lo):
            se = d["std"] / max(d["n"], 1) ** 0.5
            a_lo.bar(j, d["mean"], yerr=se, color=colors[j % len(colors)], capsize=3)
        a_lo.axhline(0, color="black", linewidth=0.8)
        a_lo.set_xticks(range(len(lo)))
        a_lo.set_xticklabels([_short(n) for n, _ in lo], rotation=20, ha="right", fontsize=8)
        a_lo.set_ylabel("log P(refusal) - log P(compliance)")
        a_lo.set_title(f"refusal log-odds at the first reply token (mean ± s.e.), n={lo[0][1]['n']}", fontsize=9)
    else:
        _not_run(a_lo, "refusal log-odds")
    kl = [(j, n, d["kl"]) for j, (n, d) in enumerate(rows) if d.get("kl")]
    if kl:
        for j, name, d in kl:
            a_kl.plot(d["positions"], d["kl"], marker="o", markersize=3, color=colors[j % len(colors)],
                      label=_short(name))
        if all(v > 0 for _, _, d in kl for v in d["kl"] if v == v):
            a_kl.set_yscale("log")
        a_kl.xaxis.set_major_locator(MaxNLocator(integer=True))
        a_kl.set_xlabel("reply position")
        a_kl.set_ylabel("KL(tuned || base), nats")
        a_kl.legend(fontsize=7)
        a_kl.set_title(f"per-token KL to the base on its greedy reply, n={kl[0][2]['n_prompts']}", fontsize=9)
    else:
        _not_run(a_kl, "reply KL to the base (needs a base and a tuned model)")
    kept = [(j, n, d["direction"]) for j, (n, d) in enumerate(rows) if d.get("direction") and "kept" in d["direction"]]
    if kept:
        for j, name, d in kept:
            a_dir.plot(range(len(d["kept"])), d["kept"], marker="o", markersize=3, color=colors[j % len(colors)],
                       label=_short(name))
        a_dir.axhline(1.0, color="black", linestyle="--", linewidth=0.8, label="base")
        a_dir.axvline(kept[0][2]["best_layer"], color="grey", linestyle=":", linewidth=0.8)
        a_dir.xaxis.set_major_locator(MaxNLocator(integer=True))
        a_dir.set_xlabel("layer (residual stream entering it)")
        a_dir.set_ylabel("harmful-benign gap kept")
        a_dir.legend(fontsize=7)
        a_dir.set_title(f"refusal direction kept, n={kept[0][2]['n_harmful']} harmful / "
                        f"{kept[0][2]['n_benign']} benign", fontsize=9)
    else:
        _not_run(a_dir, "refusal direction kept (needs a tuned model)")
    fig.suptitle("ssah-plugin deep safety evaluation", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax, items: list, colors: list) -> None:
    if not items:
        _not_run(ax, "over-refusal")
        return
    for j, (name, d) in enumerate(items):
        ax.bar(j, 100 * d["rate"], yerr=_err(d["rate"], d["wilson95"]), color=colors[j % len(colors)], capsize=3)
    ax.set_xticks(range(len(items)))
    ax.set_xticklabels([_short(n) for n, _ in items], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("false-refusal rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"over-refusal on held-out benign prompts, n={items[0][1]['n']}", fontsize=9)
