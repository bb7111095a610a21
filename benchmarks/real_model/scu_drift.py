"""Diagnostic: do frozen SCU keep their *function* after fine-tuning, or only their weights?

Re-runs ``ssah_plugin.locate.locate`` on a fine-tuned checkpoint with the study's calibration data (the same
``safety.jsonl`` / ``utility.jsonl`` and config as the ``locate`` stage) and compares the units' safety scores with
the base model's. Under the plugin the SCU weights are bit-exact, so a change of their score
(``Var(X_j) * ||W[:, j]||^2``) comes only from their inputs, i.e. from the trainable parameters upstream.

    python benchmarks/real_model/scu_drift.py /work/cache/study-lr2e-5/ft-harmful-scu_cu/checkpoint \
        --name harmful-scu+cu-lr2e-5
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--name", required=True)
    p.add_argument("--root", default="/work/cache/study")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real_model"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssah_plugin.locate import LocateConfig, locate
    from ssah_plugin.mask import CLASS_CODES, Mask

    loc = json.loads((Path(args.root) / "locate" / "result.json").read_text())
    base = Mask.load(loc["mask"])
    cfg = dict(loc["config"])
    cfg = LocateConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()})
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    d = Path(args.root) / "locate"
    tuned = locate(model, tok, safety=str(d / "safety.jsonl"), utility=str(d / "utility.jsonl"), config=cfg)

    scu = torch.cat([c.to(torch.int64) == CLASS_CODES["SCU"] for c in base.classes])
    out: dict = {"checkpoint": args.checkpoint, "name": args.name, "n_scu": int(scu.sum())}
    for kind in ("safety", "utility"):
        b = torch.cat(base.scores[kind])
        t = torch.cat(tuned.scores[kind])
        ratio = (t[scu] / b[scu].clamp_min(1e-30)).log10()
        out[f"{kind}_score_log10_ratio_scu"] = {"median": float(ratio.median()), "q10": float(ratio.quantile(0.1)),
                                                "q90": float(ratio.quantile(0.9))}
        ratio_all = (t / b.clamp_min(1e-30)).log10()
        out[f"{kind}_score_log10_ratio_all"] = {"median": float(ratio_all.median()),
                                                "q10": float(ratio_all.quantile(0.1)),
                                                "q90": float(ratio_all.quantile(0.9))}
    tuned_scu = torch.cat([c.to(torch.int64) == CLASS_CODES["SCU"] for c in tuned.classes])
    out["base_scu_still_scu"] = float((scu & tuned_scu).sum() / scu.sum())
    bz = torch.cat(base.scores["safety_z"]) - torch.cat(base.scores["utility_z"])
    tz = torch.cat(tuned.scores["safety_z"]) - torch.cat(tuned.scores["utility_z"])
    out["spearman_zdiff_all_units"] = float(torch.corrcoef(torch.stack([bz.argsort().argsort().double(),
                                                                         tz.argsort().argsort().double()]))[0, 1])
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / "scu_drift.json"
    allres = json.loads(path.read_text()) if path.exists() else {}
    allres[args.name] = out
    path.write_text(json.dumps(allres, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
