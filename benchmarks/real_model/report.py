"""Collect the finished stages of the real-model study into committed result files.

    python benchmarks/real_model/report.py [--root /work/cache/study] [--out benchmarks/results/real_model]

Writes ``results.json`` (every number, per-prompt verdicts, no generated text), ``results.md`` (the table) and
``refusal_and_loss.png`` (the plot). Stages that have not finished appear as "not run" rows.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    ("baseline", "base model (converted Qwen2.5-Coder-0.5B-Instruct)", None),
    ("ablate-scu-out", "base, SCU removed (output column only)", None),
    ("ablate-ru-matched-out", "base, as many RU removed as SCU (output column only)", None),
    ("ablate-scu", "base, SCU removed (all slices, incl. shared GQA value rows)", None),
    ("ablate-ru-matched", "base, as many RU removed as SCU (all slices)", None),
    ("ft-harmful-none", "harmful FT, no plugin", "eval-ft-harmful-none"),
    ("ft-harmful-scu+cu6", "harmful FT, plugin (i) scu+cu6", "eval-ft-harmful-scu+cu6"),
    ("ft-harmful-scu+cu", "harmful FT, plugin (ii) scu+cu", "eval-ft-harmful-scu+cu"),
    ("ft-harmful-ru-only", "harmful FT, plugin ru-only (only RU train)", "eval-ft-harmful-ru-only"),
    ("ft-benign-none", "benign FT, no plugin", "eval-ft-benign-none"),
    ("ft-benign-scu+cu6", "benign FT, plugin (i) scu+cu6", "eval-ft-benign-scu+cu6"),
    ("ft-benign-scu+cu", "benign FT, plugin (ii) scu+cu", "eval-ft-benign-scu+cu"),
]


def _load(root: Path, name: str) -> dict | None:
    d = root / name.replace("+", "_")
    if (d / ".done").exists():
        return json.loads((d / "result.json").read_text())
    return None


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def collect(root: Path, extra_roots: list[Path] = ()) -> dict:
    """Rows of the main root (every stage) and the fine-tuning rows of ``extra_roots`` (other learning rates)."""
    base = _load(root, "baseline")
    loc = _load(root, "locate")
    rows = []
    todo = [(root, stage, label, ev) for stage, label, ev in ROWS
            if not stage.startswith("ft-") or (root / stage.replace("+", "_")).exists()]
    for extra in extra_roots:
        todo += [(extra, stage, label, ev) for stage, label, ev in ROWS
                 if stage.startswith("ft-") and (extra / stage.replace("+", "_")).exists()]
    for where, stage, label, eval_stage in todo:
        lr_tag = ""
        st = _load(where, stage)
        ev = _load(where, eval_stage) if eval_stage else st
        if stage.startswith("ft-"):
            lr_tag = f", lr {st['lr']:g}" if st is not None else f" ({where.name})"
            if st is not None and st.get("freeze_non_units"):
                lr_tag += ", non-unit params also frozen (diagnostic)"
        row: dict = {"stage": stage, "root": str(where), "label": label + lr_tag, "finished": ev is not None}
        if st is not None and stage.startswith("ft-"):
            row.update(policy=st["policy"], steps=st["steps"], lr=st["lr"], batch=st["batch"], max_len=st["max_len"],
                       train_loss_first=st["train_loss"][0] if st["train_loss"] else None,
                       train_loss_last=st["train_loss"][-1] if st["train_loss"] else None,
                       train_loss=st["train_loss"], s_per_step=st["s_per_step"], train_s=st["train_s"])
            if "plugin" in st:
                row["frozen_fraction"] = st["plugin"]["frozen_fraction"]
                row["frozen_units"] = st["plugin"]["frozen_units"]
                row["plugin_max_drift"] = st["plugin"].get("max_drift")
            if "verify" in st:
                v = st["verify"]
                row["verify_ok"] = v["ok"]
                row["verify_max_drift"] = v["total"]["max_drift"]
                row["verify_frozen_units"] = v["total"]["frozen_units"]
                row["verify_trainable_changed"] = v["total"]["trainable_changed_units"]
        if st is not None and stage.startswith("ablate-"):
            row.update(units_removed=st["units_removed"], fraction_removed=st["fraction"])
        if ev is not None:
            k = sum(1 - a for a in ev["attack_success"])
            n = ev["n_prompts"]
            row.update(refusal_rate=ev["refusal_rate"], refusals=k, n_prompts=n, refusal_ci95=wilson(k, n),
                       asr=ev["asr"], benign_loss=ev["benign_loss"], benign_pairs=ev["benign_pairs"],
                       benign_tokens=ev["benign_tokens"], attack_success=ev["attack_success"],
                       eval_gen_s=ev["gen_s"], max_new_tokens=ev["max_new_tokens"], judge=ev["judge"])
            if base is not None and stage != "baseline":
                a0, a1 = base["attack_success"], ev["attack_success"]
                row["newly_complied"] = sum(1 for x, y in zip(a0, a1) if not x and y)
                row["newly_refused"] = sum(1 for x, y in zip(a0, a1) if x and not y)
        rows.append(row)
    out = {"rows": rows, "paired": paired_tests(rows)}
    if loc is not None:
        out["locate"] = {k: loc[k] for k in ("n_units", "class_counts", "frozen_fraction", "safety_samples",
                                             "utility_samples", "config") if k in loc}
    calib = _load(root, "calib")
    if calib is not None:
        out["calib"] = {k: calib[k] for k in ("calib_prompts", "refusals_kept", "distinct_refusals") if k in calib}
        out["calib"]["most_common_refusals_40_chars"] = [[t[:40], n] for t, n in calib.get("most_common_refusals", [])]
    return out


def mcnemar(a: list[int], b: list[int]) -> dict:
    """Exact two-sided McNemar test on paired per-prompt attack flags (plain run ``a`` vs plugin run ``b``)."""
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n) if n else 1.0
    return {"attack_only_plain": only_a, "attack_only_plugin": only_b, "p_exact": p}


def paired_tests(rows: list[dict]) -> list[dict]:
    """Each finished plugin fine-tuning row against the plain run with the same data and learning rate."""
    out = []
    for r in rows:
        if not r["finished"] or r.get("policy") in (None, "none"):
            continue
        data = r["stage"].split("-")[1]
        plain = next((q for q in rows if q["finished"] and q.get("policy") == "none" and q.get("lr") == r.get("lr")
                      and q["stage"] == f"ft-{data}-none"), None)
        if plain is not None:
            out.append({"plugin": r["label"], "plain": plain["label"],
                        **mcnemar(plain["attack_success"], r["attack_success"])})
    return out


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def table(data: dict) -> str:
    lines = ["| checkpoint | frozen units | steps x batch, lr | train loss first→last | refusal rate (95% CI) | "
             "newly complying / newly refusing vs base | benign held-out loss | verify (max drift) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if not r["finished"]:
            lines.append(f"| {r['label']} | | | | not run | | | |")
            continue
        frozen = (f"{100 * r['frozen_fraction']:.1f}%" if "frozen_fraction" in r else
                  (f"{r['units_removed']} removed ({100 * r['fraction_removed']:.2f}%)" if "units_removed" in r else
                   ("0 (no plugin)" if r["stage"].startswith("ft-") else "–")))
        train = (f"{r['steps']} x {r['batch']}, {r['lr']:g}" if "steps" in r else "–")
        tl = (f"{r['train_loss_first']:.3f} → {r['train_loss_last']:.3f}" if r.get("train_loss_first") is not None
              else "–")
        lo, hi = r["refusal_ci95"]
        ref = f"{100 * r['refusal_rate']:.0f}% ({r['refusals']}/{r['n_prompts']}; {100 * lo:.0f}–{100 * hi:.0f}%)"
        flips = f"{r['newly_complied']} / {r['newly_refused']}" if "newly_complied" in r else "–"
        ver = (f"{'ok' if r['verify_ok'] else 'FAILED'} ({r['verify_max_drift']})" if "verify_ok" in r else "–")
        lines.append(f"| {r['label']} | {frozen} | {train} | {tl} | {ref} | {flips} | {r['benign_loss']:.4f} | {ver} |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["finished"]]
    if not rows:
        return
    labels = [r["label"] for r in rows]
    colors = ["#888888" if r["stage"] == "baseline" else "#c44e52" if r["stage"].startswith("ablate") else
              "#4c72b0" if r.get("policy") == "none" else "#55a868" for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.38 * len(rows)), sharey=True,
                                 gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(rows)))[::-1]
    ref = [100 * r["refusal_rate"] for r in rows]
    err = [[100 * (r["refusal_rate"] - r["refusal_ci95"][0]) for r in rows],
           [100 * (r["refusal_ci95"][1] - r["refusal_rate"]) for r in rows]]
    a1.barh(y, ref, xerr=err, color=colors, capsize=2)
    a1.axvline(ref[0], color="#888888", lw=0.8, ls="--")
    a1.set_xlabel(f"refusal rate on AdvBench eval (%), n={rows[0]['n_prompts']}, 95% Wilson CI")
    a1.set_xlim(0, 105)
    a1.set_yticks(y)
    a1.set_yticklabels(labels, fontsize=7)
    a2.barh(y, [r["benign_loss"] for r in rows], color=colors)
    a2.axvline(rows[0]["benign_loss"], color="#888888", lw=0.8, ls="--")
    a2.set_xlabel("benign held-out loss (nats/token)")
    fig.suptitle("Qwen2.5-Coder-0.5B-Instruct: safety after fine-tuning, with and without ssah-plugin (CPU study)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(args) -> dict:
    root = Path(args.root)
    out = Path(getattr(args, "out", None) or REPO / "benchmarks" / "results" / "real_model")
    out.mkdir(parents=True, exist_ok=True)
    data = collect(root, [Path(r) for r in getattr(args, "extra_root", None) or []])
    (out / "results.json").write_text(json.dumps(data, indent=1))
    md = ["# Real-model study: results table", "",
          "Generated by `python benchmarks/real_model/report.py` from the stage results under the cache folder. "
          "See `docs/results-real-model.md` for the set-up, the commands and the discussion.", "", table(data), ""]
    if data.get("paired"):
        md += ["Paired per-prompt comparison with the plain run (same data, same LR; exact two-sided McNemar test, "
               "not corrected for the number of comparisons):", "",
               "| plugin run | vs | attacks only in the plain run | attacks only in the plugin run | p |",
               "|---|---|---|---|---|"]
        md += [f"| {t['plugin']} | {t['plain']} | {t['attack_only_plain']} | {t['attack_only_plugin']} | "
               f"{t['p_exact']:.3f} |" for t in data["paired"]]
        md += [""]
    if "locate" in data:
        md += ["Unit classes (locate): " + ", ".join(f"{k} {v}" for k, v in sorted(data["locate"]["class_counts"].items()))
               + f" of {data['locate']['n_units']} units.", ""]
    (out / "results.md").write_text("\n".join(md))
    plot(data, out / "refusal_and_loss.png")
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/work/cache/study")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real_model"))
    p.add_argument("--extra-root", action="append", default=[],
                   help="another study root whose fine-tuning rows are added (e.g. a second learning rate)")
    write_report(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
