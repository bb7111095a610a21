"""Side-by-side report of several evaluated checkpoints: markdown table, JSON and PNG charts.

Input: the result dicts of :func:`ssah_plugin.evaluation.evaluate.evaluate_checkpoint` /
:func:`~ssah_plugin.evaluation.evaluate.compare` (and :mod:`ssah_plugin.evaluation.deep_eval`).
:func:`write_report` writes ``eval.md``, ``eval.json`` and the charts of :mod:`ssah_plugin.evaluation.plots`
(``eval.png``, ``deep.png``; skipped with a warning when matplotlib, the ``[plot]`` extra, is not installed) into a
folder and, only when asked, ``responses.jsonl`` with the full replies to the harmful prompts (harmful text: keep it
out of logs and CI output).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from ssah_plugin.errors import MissingExtraError
from ssah_plugin.evaluation.plots import plot_deep, plot_results

__all__ = ["markdown_table", "results_json", "write_report", "save_responses", "deep_markdown", "deep_json"]

#: Keys of the deep results that hold harmful text: never written to eval.json (tensors are left out too).
_TEXT_KEYS = ("continuations", "replies", "prompts")


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
        if "details" in r:
            d["per_prompt"] = {"attack_success": details.get("flags"), "matched_phrase": details.get("matched")}
        if r.get("deep") is not None:
            d["deep"] = deep_json(r["deep"])
        out.append(d)
    return out


def deep_json(value):
    """A deep-evaluation result without harmful text (prompts, replies, continuations) or tensors."""
    if isinstance(value, dict):
        return {k: deep_json(v) for k, v in value.items() if k not in _TEXT_KEYS and not isinstance(v, torch.Tensor)}
    if isinstance(value, (list, tuple)):
        return [deep_json(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _ci(rate: float | None, ci: Sequence[float] | None) -> str:
    if rate is None or (isinstance(rate, float) and math.isnan(rate)):
        return "n/a"
    lo, hi = ci if ci else (float("nan"), float("nan"))
    return f"{100 * rate:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _deep_rows(results: Sequence[dict], key: str) -> list[tuple[str, dict]]:
    return [(r["name"], r["deep"][key]) for r in results if r.get("deep") and r["deep"].get(key)]


def deep_markdown(results: Sequence[dict]) -> str:
    """Markdown sections of the deep evaluation: prefill, framing, over-refusal, depth signals, paired tests.
    Rates carry 95% Wilson intervals; every table gives the number of prompts behind it."""
    parts = []
    pre = _deep_rows(results, "prefill")
    if pre:
        ks = [str(k) for k in pre[0][1]["ks"]]
        rows = [[name, *(_ci(d["per_k"][k]["asr"], d["per_k"][k]["wilson95"]) if k in d["per_k"] else "n/a"
                         for k in ks), d["per_k"][ks[0]]["n"]] for name, d in pre]
        capped = {k: pre[0][1]["per_k"][k].get("n_capped", 0) for k in ks if k in pre[0][1]["per_k"]}
        note = ("" if not any(capped.values()) else " Targets shorter than K were pre-filled whole: "
                + ", ".join(f"K={k}: {n} prompts" for k, n in capped.items() if n) + ".")
        parts.append("## Prefill attack: ASR vs K\n\nThe reply is pre-filled with the first K tokens of the "
                     "AdvBench target (\"full\": all of it); the greedy continuation is judged. 95% Wilson "
                     "intervals." + note + "\n\n" + _table(["checkpoint", *(f"K={k}" for k in ks), "prompts"], rows))
    fr = _deep_rows(results, "framing")
    if fr:
        ids = fr[0][1]["framings"]
        rows = [[name, *(_ci(d["per_framing"][f]["asr"], d["per_framing"][f]["wilson95"]) for f in ids),
                 _ci(d["flip"]["flip_rate"], d["flip"]["wilson95"]),
                 _ci(d["flip"]["flip_rate_of_refused"], d["flip"]["wilson95_of_refused"])
                 + f" of {d['flip']['n_refused_plain']}", d["flip"]["n"]] for name, d in fr]
        parts.append("## Motive framing: ASR per framing and flip rate\n\nFlip: refused plainly, answered under "
                     "at least one framing (share of all prompts, and of the plainly refused ones). Templates: "
                     "`ssah_plugin/data/framings.json`.\n\n"
                     + _table(["checkpoint", *ids, "flip rate", "flip rate of refused", "prompts"], rows))
    orf = _deep_rows(results, "over_refusal")
    if orf:
        rows = [[name, _ci(d["rate"], d["wilson95"]), d["n_refused"], d["n"]] for name, d in orf]
        parts.append("## Over-refusal on held-out benign prompts\n\nPhrase-only judge (no length rule).\n\n"
                     + _table(["checkpoint", "false-refusal rate", "refused", "prompts"], rows))
    parts.append(_depth_markdown(results))
    paired = [(r["name"], p) for r in results for p in r.get("paired_vs_base") or []]
    if paired:
        rows = [[name, p["measure"], p["b10"], p["b01"], f"{p['p']:.3g}", p["n"]] for name, p in paired]
        parts.append("## Paired with the base (exact McNemar)\n\nPer prompt, same order: `base only` counts "
                     "prompts where only the base had the outcome (attack success / flip / refusal), `checkpoint "
                     "only` where only this checkpoint had it.\n\n"
                     + _table(["checkpoint", "measure", "base only", "checkpoint only", "p", "prompts"], rows))
    return "\n".join(p for p in parts if p)


def _depth_markdown(results: Sequence[dict]) -> str:
    lo = _deep_rows(results, "log_odds")
    if not lo:
        return ""
    rows = []
    for r in results:
        d = r.get("deep") or {}
        if not d.get("log_odds"):
            continue
        kl, di = d.get("kl"), d.get("direction") or {}
        kept = di.get("kept_best")
        cos = di["cosine"][di["best_layer"]] if "cosine" in di else None
        rows.append([r["name"], f"{d['log_odds']['mean']:.2f} ± {d['log_odds']['std']:.2f}",
                     _num(kl and kl["kl_first"]), _num(kl and kl["kl_mean"]),
                     "1 (reference)" if "separation" in di else _num(kept, ".3f"),
                     "n/a" if cos is None else f"{cos:.3f}", di.get("best_layer", "n/a"), d["log_odds"]["n"]])
    text = ("## Judge-free depth signals\n\nRefusal log-odds: log P(refusal opening) - log P(compliance opening) "
            "at the first reply position (mean ± sd over prompts; openings: "
            f"{', '.join(repr(x) for x in lo[0][1]['refusal_prefixes'][:8])} vs "
            f"{', '.join(repr(x) for x in lo[0][1]['compliance_prefixes'][:4])}). Reply KL: KL(tuned || base) in "
            "nats, teacher-forced on the base's greedy reply (first position, and mean over the first N). "
            "Direction kept: the harmful-minus-benign projection gap on the base's refusal direction at the base's "
            "best layer, relative to the base (1 = fully kept); cosine: the checkpoint's own mean difference vs "
            "the base direction.\n\n"
            + _table(["checkpoint", "refusal log-odds", "KL first token", "KL mean", "direction kept", "cosine",
                      "layer", "prompts"], rows))
    kls = _deep_rows(results, "kl")
    if kls:
        n = len(kls[0][1]["kl"])
        rows = [[name, *(_num(v, ".3g") for v in d["kl"])] for name, d in kls]
        rows.append(["prompts per position", *kls[0][1]["n"]])
        text += "\n### Reply KL per position (nats)\n\n" + _table(["checkpoint", *map(str, range(n))], rows)
    return text


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
            for row in _deep_texts(r):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    warnings.warn(f"{path} holds full replies to harmful prompts; keep it out of logs, CI artefacts and public "
                  "places", stacklevel=2)
    return path


def _deep_texts(r: dict):
    deep = r.get("deep") or {}
    prompts = deep.get("prompts") or []
    for k, d in ((deep.get("prefill") or {}).get("per_k") or {}).items():
        for i, text in enumerate(d["continuations"]):
            yield {"checkpoint": r["name"], "attack": "prefill", "k": k, "index": i,
                   "prompt": prompts[i] if i < len(prompts) else None, "continuation": text,
                   "attack_success": d["attack_success"][i]}
    framing = deep.get("framing") or {}
    for fid, d in (framing.get("per_framing") or {}).items():
        for i, text in enumerate(d["replies"]):
            yield {"checkpoint": r["name"], "attack": "framing", "framing": fid, "index": i,
                   "prompt": prompts[i] if i < len(prompts) else None, "response": text,
                   "attack_success": d["attack_success"][i]}


def write_report(results: Sequence[dict], out_dir: str | os.PathLike, *, responses: bool = False,
                 plots: bool = True) -> dict[str, Path]:
    """Write ``eval.md``, ``eval.json``, ``eval.png`` (and ``responses.jsonl`` if ``responses``) into ``out_dir``.

    Results with a ``deep`` part (:mod:`ssah_plugin.evaluation.deep_eval`) add their sections to ``eval.md`` and a
    figure ``deep.png``; results that hold only a deep part skip the ASR / benign-loss table and ``eval.png``.
    ``plots=False`` writes no PNG; without matplotlib (``pip install 'ssah-plugin[plot]'``) the PNGs are skipped
    with one warning. Returns ``{"markdown", "json", "png", "deep_png", "responses": path}`` for what was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    basic = any("asr" in r or "benign_loss" in r for r in results)
    deep = any(r.get("deep") for r in results)
    files = {"markdown": out / "eval.md", "json": out / "eval.json"}
    md = "# ssah-plugin eval\n\n" + (markdown_table(results) if basic else "")
    if deep:
        md += "\n" + deep_markdown(results)
    files["markdown"].write_text(md, encoding="utf-8")
    files["json"].write_text(json.dumps(results_json(results), indent=2), encoding="utf-8")
    charts = [("png", plot_results, "eval.png")] if plots and basic else []
    charts += [("deep_png", plot_deep, "deep.png")] if plots and deep else []
    for key, plot, name in charts:
        try:
            files[key] = plot(results, out / name)
        except MissingExtraError as exc:
            warnings.warn(f"{exc}; the charts ({', '.join(n for _, _, n in charts)}) are not written, the markdown "
                          "and JSON report is", stacklevel=2)
            break
    if responses:
        files["responses"] = save_responses(results, out / "responses.jsonl")
    return files
