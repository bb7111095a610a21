"""``ssah-plugin inspect``: what a mask file holds: classes per layer and module type, frozen units per policy."""
from __future__ import annotations

import argparse
import json

from ssah_plugin.core.classes import CLASS_CODES
from ssah_plugin.core.mask_report import frozen_table, listed_policies

HELP = "show a mask: unit classes per layer and module type, frozen units per policy; optional PNG plot"
EPILOG = """examples:
  ssah-plugin inspect mask.safetensors
  ssah-plugin inspect mask.safetensors --json > mask.json
  ssah-plugin inspect mask.safetensors --plot mask.png --policy scu+cu:0.1
"""

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mask", help="mask file (.safetensors) written by locate or Mask.save")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a plot of the classes across layers")
    p.add_argument("--policy", action="append", default=[], help="also count this policy (repeatable)")


def report(mask, extra_policies=()) -> dict:
    """The inspect report as a JSON-able dict."""
    out: dict = {
        "architecture": mask.architecture, "model_class": mask.model_class, "granularity": mask.granularity,
        "groups": len(mask.groups), "units": mask.n_units, "default_policy": mask.default_policy,
        "stored_policies": mask.policies, "scores": list(mask.scores),
        "method": {k: v for k, v in mask.method.items() if k in ("name", "mode", "standardize", "data", "auto",
                                                                  "selections")},
    }
    if "config" in mask.method:
        cfg = mask.method["config"]
        out["method"]["sizes"] = {k: cfg.get(k) for k in ("scu", "ucu", "ru")}
        out["method"]["tokens"] = cfg.get("tokens")
    names = ("SCU", "UCU", "CU", "RU")
    if mask.classes is not None:
        out["classes"] = mask.summary()["classes"]
        per_kind: dict = {}
        per_layer: dict = {}
        for g, c in zip(mask.groups, mask.classes):
            c = c.to("cpu").long()
            counts = {n: int((c == CLASS_CODES[n]).sum()) for n in names}
            k = per_kind.setdefault(g.kind, {n: 0 for n in names} | {"units": 0})
            layer = per_layer.setdefault(str(g.layer), {})
            layer[g.kind] = counts
            for n in names:
                k[n] += counts[n]
            k["units"] += g.n_units
        out["per_module_type"] = per_kind
        out["per_layer"] = per_layer
    frozen = frozen_table(mask, listed_policies(mask, extra_policies))
    out["frozen"] = frozen
    return out


def _print_text(rep: dict) -> None:
    print(f"mask for {rep['architecture']} ({rep['model_class']}): {rep['units']} units in {rep['groups']} groups, "
          f"attention units per {rep['granularity']}")
    m = rep["method"]
    if m.get("name"):
        line = f"method: {m['name']}"
        if m.get("mode"):
            line += f", {m['mode']}"
        if m.get("sizes"):
            line += ", sizes " + ", ".join(f"{k.upper()} {v:.1%}" for k, v in m["sizes"].items() if v is not None)
        print(line)
    if "classes" in rep:
        c = rep["classes"]
        print("classes: " + ", ".join(f"{k} {c[k]} ({c[k] / max(rep['units'], 1):.1%})" for k in ("SCU", "UCU", "CU",
                                                                                               "RU")))
        for kind, row in rep["per_module_type"].items():
            print(f"  {kind:<5} {row['units']:>8} units: " + ", ".join(f"{k} {row[k]}" for k in ("SCU", "UCU", "CU",
                                                                                               "RU")))
        print("per layer (SCU / UCU / CU / RU):")
        for layer, kinds in rep["per_layer"].items():
            cells = [f"{kind} {r['SCU']}/{r['UCU']}/{r['CU']}/{r['RU']}" for kind, r in kinds.items()]
            print(f"  layer {layer:>3}: " + "   ".join(cells))
    else:
        print("classes: none (explicit mask)")
    for name, sel in m.get("selections", {}).items():  # decision / conflict units (ssah_plugin.core.selections)
        print(f"selection {name}: stored top {sel['fraction']:.1%} ({sel['stored_units']} units) by {sel['rank']}; "
              f"other sizes: --policy {name}:F")
    print(f"frozen units per policy (default: {rep['default_policy']}):")
    for pol, f in rep["frozen"].items():
        kinds = ", ".join(f"{k} {v}" for k, v in f["per_module_type"].items())
        print(f"  {pol:<12} {f['units']:>8} ({f['fraction']:.1%})  [{kinds}]")


def run(args: argparse.Namespace) -> int:
    from ssah_plugin.core.mask import Mask

    mask = Mask.load(args.mask)
    rep = report(mask, args.policy)
    if args.plot:
        if mask.classes is None:
            from ssah_plugin.errors import DataError

            raise DataError(f"{args.mask} has no unit classes to plot (an explicit mask); drop --plot")
        from ssah_plugin.evaluation.plots import plot_classes

        rep["plot"] = str(plot_classes(mask, args.plot))
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        _print_text(rep)
        if args.plot:
            print(f"plot written to {rep['plot']}")
    return 0
