"""``ssah-plugin locate``: score and classify every unit of a model, write the mask file."""
from __future__ import annotations

import argparse
import json

HELP = "find the safety-critical units of a model (SCU/UCU/CU/RU) and write a mask file"
EPILOG = """examples:
  ssah-plugin locate --model meta-llama/Llama-2-7b-chat-hf -o llama2.mask.safetensors
  ssah-plugin locate --model ./my-chat-model --safety refusals.jsonl --utility alpaca.jsonl \\
      --max-samples 128 --max-length 512 -o mask.safetensors
  ssah-plugin locate --model ./my-chat-model --safety shipped:advbench.jsonl --own-refusals -o mask.safetensors
  ssah-plugin locate --model tiny:llama --max-samples 8 --max-length 128 -o /tmp/tiny.mask.safetensors

Data: .jsonl/.json/.csv/.parquet files, shipped:NAME (files in ssah_plugin/data), or a datasets hub name.
Defaults: shipped:safety_refusals.jsonl and shipped:benign_instructions.jsonl.
"""


def _fraction(text: str) -> float:
    v = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1] (or a percentage like 1.3%)")
    return v


def _grid(text: str) -> tuple[float, ...]:
    return tuple(_fraction(t) for t in text.split(",") if t.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ssah_plugin.locate.runner import (
        DEFAULT_SHIPPED_SAFETY,
        DEFAULT_SHIPPED_UTILITY,
    )

    p.add_argument("--model", required=True, help="local HF folder, hub name, or tiny:<family> (tests/demo)")
    p.add_argument("--tokenizer", help="tokenizer folder/name if it differs from --model")
    p.add_argument("--safety", default=DEFAULT_SHIPPED_SAFETY, help="safety data: prompt/response rows (refusals)")
    p.add_argument("--utility", default=DEFAULT_SHIPPED_UTILITY, help="utility data: instruction/input/output rows")
    p.add_argument("-o", "--output", required=True, help="mask file to write (.safetensors)")
    g = p.add_argument_group("calibration")
    g.add_argument("--max-samples", type=int, default=128, help="rows drawn from each data set (default 128; 0=all)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-length", type=int, help="truncate conversations to this many tokens")
    g.add_argument("--tokens", choices=("response", "all"), default="response",
                   help="positions counted: those predicting response tokens (default) or all non-padding ones")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--own-refusals", action="store_true",
                   help="generate the model's replies to the safety prompts and keep its refusals")
    g.add_argument("--refusal-max-new-tokens", type=int, default=64)
    for which, fields in (("safety", ("prompt", "response")), ("utility", ("prompt", "response", "input"))):
        for f in fields:
            g.add_argument(f"--{which}-{f}-field", help=f"column holding the {which} {f} (default: auto-detect)")
    s = p.add_argument_group("scores and classes")
    s.add_argument("--granularity", choices=("channel", "head"), default="channel", help="attention unit size")
    s.add_argument("--standardize", choices=("group", "global", "none"), default="group",
                   help="z-score per unit group (default), over all units, or none")
    s.add_argument("--scu", type=_fraction, default=0.013, help="SCU fraction of all units (default 1.3%%)")
    s.add_argument("--ucu", type=_fraction, default=0.133, help="UCU fraction (default 13.3%%)")
    s.add_argument("--ru", type=_fraction, default=0.148, help="RU fraction (default 14.8%%)")
    s.add_argument("--class-order", default="SCU,RU,UCU", help="order in which classes pick units (default SCU,RU,UCU)")
    a = p.add_argument_group("automatic sizes (ablation sweep on held-apart data)")
    a.add_argument("--auto", action="store_true", help="choose SCU and RU sizes by zeroing candidates")
    a.add_argument("--auto-holdout", type=int, default=32, help="rows of each data set held apart")
    a.add_argument("--auto-scu-grid", type=_grid, help="SCU sizes to try, e.g. 0.005,0.01,0.02")
    a.add_argument("--auto-ru-grid", type=_grid, help="RU sizes to try, e.g. 0.05,0.1,0.2")
    a.add_argument("--auto-refusal-drop", type=float, default=0.5)
    a.add_argument("--auto-utility-tolerance", type=float, default=0.05)
    a.add_argument("--auto-ru-refusal-tolerance", type=float, default=0.05)
    x = p.add_argument_group("extra unit selections (policies decision:F, conflict:F, scu+decision:F, ...)")
    x.add_argument("--decision-units", action="store_true",
                   help="score decision units: harmful vs benign separation at the last prompt token")
    x.add_argument("--decision-fraction", type=_fraction, default=0.05,
                   help="fraction of all units in the stored 'decision' set (default 5%%)")
    x.add_argument("--decision-weight", choices=("norm", "none"), default="norm",
                   help="Cohen's d times ||W[:, j]|| (default) or d alone")
    x.add_argument("--task-data", metavar="FILE",
                   help="sample of your training data (prompt/response rows): scores task-conflict units")
    x.add_argument("--conflict-fraction", type=_fraction, default=0.05,
                   help="fraction of all units in the stored 'conflict' set (default 5%%)")
    x.add_argument("--task-max-samples", type=int, default=128, help="task rows drawn (default 128; 0=all)")
    for f in ("prompt", "response", "input"):
        x.add_argument(f"--task-{f}-field", help=f"column holding the task {f} (default: auto-detect)")
    r = p.add_argument_group("resources")
    r.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:1 ...")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype")
    r.add_argument("--layerwise", choices=("auto", "on", "off"), default="auto",
                   help="one decoder layer in memory at a time (auto: when the model would not fit)")
    r.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_from_args(args: argparse.Namespace):
    from ssah_plugin.locate.runner import LocateConfig

    kw = dict(
        max_samples=args.max_samples or None, batch_size=args.batch_size, max_length=args.max_length,
        tokens=args.tokens, granularity=args.granularity, standardize=args.standardize, scu=args.scu, ucu=args.ucu,
        ru=args.ru, class_order=tuple(c.strip().upper() for c in args.class_order.split(",")), seed=args.seed,
        own_refusals=args.own_refusals, refusal_max_new_tokens=args.refusal_max_new_tokens, device=args.device,
        dtype=args.dtype, layerwise=args.layerwise, progress=not args.no_progress,
        safety_prompt_field=args.safety_prompt_field, safety_response_field=args.safety_response_field,
        utility_prompt_field=args.utility_prompt_field, utility_response_field=args.utility_response_field,
        utility_input_field=args.utility_input_field, auto=args.auto, auto_holdout=args.auto_holdout,
        auto_refusal_drop=args.auto_refusal_drop, auto_utility_tolerance=args.auto_utility_tolerance,
        auto_ru_refusal_tolerance=args.auto_ru_refusal_tolerance,
        decision_units=args.decision_units, decision_fraction=args.decision_fraction,
        decision_weight=args.decision_weight, conflict_fraction=args.conflict_fraction,
        task_max_samples=args.task_max_samples or None, task_prompt_field=args.task_prompt_field,
        task_response_field=args.task_response_field, task_input_field=args.task_input_field,
    )
    if args.auto_scu_grid:
        kw["auto_scu_grid"] = args.auto_scu_grid
    if args.auto_ru_grid:
        kw["auto_ru_grid"] = args.auto_ru_grid
    try:
        return LocateConfig(**kw)
    except ValueError as exc:
        from ssah_plugin.errors import DataError

        raise DataError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from ssah_plugin.io.model_path import check_model_path, check_output_file
    from ssah_plugin.locate.runner import locate_pretrained

    check_output_file(args.output, what="--output")  # before the work, not after it
    check_model_path(args.model)
    cfg = config_from_args(args)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    mask = locate_pretrained(args.model, tokenizer, safety=args.safety, utility=args.utility, config=cfg,
                             task=args.task_data)
    if not mask.digests:  # layer-by-layer mode never held the whole model: record the base values from disk
        from pathlib import Path

        from ssah_plugin.io.checkpoint import SafetensorsCheckpoint

        if Path(args.model).is_dir():
            mask.record_base(SafetensorsCheckpoint(args.model))
    path = mask.save(args.output)
    summary = mask.summary()
    summary["mask"] = str(path)
    summary["mode"] = mask.method.get("mode")
    summary["class_sizes"] = {k: mask.method["config"][k] for k in ("scu", "ucu", "ru")}
    summary["selections"] = {k: v["stored_units"] for k, v in mask.method.get("selections", {}).items()}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        c = summary["classes"]
        print(f"wrote {path}: {summary['units']} units in {summary['groups']} groups "
              f"({summary['mode']}); SCU {c['SCU']}, UCU {c['UCU']}, CU {c['CU']}, RU {c['RU']}")
        print(f"default policy {summary['policy']}: {summary['frozen_units']} units frozen "
              f"({summary['frozen_fraction']:.1%}). Inspect with: ssah-plugin inspect {path}")
        for name, n in summary["selections"].items():
            print(f"stored selection {name!r}: {n} units (policies {name}, {name}:F, scu+{name}:F)")
    return 0
