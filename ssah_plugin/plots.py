"""Plots for ``ssah-plugin inspect --plot``: where the unit classes sit across layers (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .mask import CLASS_CODES, Mask

__all__ = ["class_table", "plot_classes", "CLASS_COLORS"]

#: class -> colour (colour-blind safe Okabe-Ito palette)
CLASS_COLORS = {"SCU": "#D55E00", "UCU": "#0072B2", "CU": "#BBBBBB", "RU": "#009E73"}
_ORDER = ("SCU", "UCU", "CU", "RU")


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
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    table = class_table(mask)
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
