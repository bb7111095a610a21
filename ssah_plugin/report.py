"""Side-by-side report of several evaluated checkpoints: markdown table, JSON and a PNG chart.

Input: the result dicts of :func:`ssah_plugin.evaluate.evaluate_checkpoint` / :func:`~ssah_plugin.evaluate.compare`.
:func:`write_report` writes ``eval.md``, ``eval.json`` and ``eval.png`` into a folder and, only when asked,
``responses.jsonl`` with the full replies to the harmful prompts (harmful text: keep it out of logs and CI output).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = ["markdown_table", "results_json", "plot_results", "write_report", "save_responses"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.1f}%"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown_table(results: Sequence[dict]) -> str:
    """One row per checkpoint: ASR, refusal rate, benign loss and perplexity, with sample sizes."""
    head = ("| checkpoint | ASR | refusal rate | harmful prompts | benign loss | perplexity | benign pairs "
            "| response tokens |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    rows = [head, sep]
    for r in results:
        rows.append(
            f"| {r['name']} | {_pct(r.get('asr'))} | {_pct(r.get('refusal_rate'))} | {r.get('n_harmful', 0)} "
            f"| {_num(r.get('benign_loss'))} | {_num(r.get('perplexity'), '.2f')} | {r.get('n_benign', 0)} "
            f"| {r.get('benign_tokens', 0)} |"
        )
    judge = next((r["judge"] for r in results if r.get("judge")), None)
    gen = next((r["generation"] for r in results if r.get("generation")), None)
    notes = []
    if judge:
        notes.append(f"ASR: keyword judge `{judge['prefix_list']}` ({judge['n_phrases']} phrases), at least "
                     f"{judge['min_words']} words, curly apostrophes normalised: {judge['normalize_apostrophes']}.")
    if gen:
        notes.append(f"Greedy decoding with the chat template, max_new_tokens={gen.get('max_new_tokens')}"
                     + (", with a system prompt." if gen.get("system") else ", no system prompt."))
    notes.append("Benign loss: mean token NLL of reference responses (response tokens only); lower is better.")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def results_json(results: Sequence[dict]) -> list[dict]:
    """JSON-able results: everything except the harmful prompts and replies (per-prompt flags are kept)."""
    out = []
    for r in results:
        d = {k: v for k, v in r.items() if k != "details"}
        details = r.get("details") or {}
        d["per_prompt"] = {"attack_success": details.get("flags"), "matched_phrase": details.get("matched")}
        out.append(d)
    return out


def plot_results(results: Sequence[dict], path: str | os.PathLike) -> Path:
    """Two bar panels, one bar per checkpoint: attack success rate (%) and benign loss."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

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


def save_responses(results: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write the full harmful prompts and replies (one JSON line per reply). Contains harmful text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in results:
            d = r.get("details") or {}
            for i, (p, resp) in enumerate(zip(d.get("prompts") or [], d.get("responses") or [])):
                f.write(json.dumps({"checkpoint": r["name"], "index": i, "prompt": p,
                                    "response": resp, "attack_success": d["flags"][i],
                                    "matched_phrase": d["matched"][i]}, ensure_ascii=False) + "\n")
    warnings.warn(f"{path} holds full replies to harmful prompts; keep it out of logs, CI artefacts and public "
                  "places", stacklevel=2)
    return path


def write_report(results: Sequence[dict], out_dir: str | os.PathLike, *, responses: bool = False) -> dict[str, Path]:
    """Write ``eval.md``, ``eval.json``, ``eval.png`` (and ``responses.jsonl`` if ``responses``) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "eval.md", "json": out / "eval.json"}
    files["markdown"].write_text("# ssah-plugin eval\n\n" + markdown_table(results), encoding="utf-8")
    files["json"].write_text(json.dumps(results_json(results), indent=2), encoding="utf-8")
    files["png"] = plot_results(results, out / "eval.png")
    if responses:
        files["responses"] = save_responses(results, out / "responses.jsonl")
    return files
