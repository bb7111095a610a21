"""``ssah-plugin locate``: score and classify every unit of a model, write the mask file.

The options are :class:`ssah_plugin.locate.config.LocateConfig`'s fields (defaults and help texts from the
dataclass), plus the data sources, ``--task-data``, ``-o`` and ``--json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Literal

from ssah_plugin.errors import DataError
from ssah_plugin.locate.config import (
    CHOICES,
    DEFAULT_SHIPPED_SAFETY,
    DEFAULT_SHIPPED_UTILITY,
    SELECTIONS,
    LocateConfig,
)

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


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip().upper() for t in text.split(",") if t.strip())


def _samples(text: str) -> int | None:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of rows >= 1, or 0 for all")
    return n or None


#: LocateConfig field metadata ``kind`` -> argparse type
_PARSERS = {"fraction": _fraction, "fractions": _grid, "names": _names, "samples": _samples}


def _shown(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)


def add_config_arguments(p: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """One option per :class:`LocateConfig` field (``max_samples`` -> ``--max-samples``), with the field's default,
    help text, choices and parser from its metadata; returns the argument groups by title."""
    hints = typing.get_type_hints(LocateConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(LocateConfig):
        meta = f.metadata
        title = meta["group"]
        g = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        flag = "--" + f.name.replace("_", "-")
        text = meta["help"].replace("%", "%%")
        if isinstance(f.default, bool):
            if f.default:
                g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=True, help=text)
            else:
                g.add_argument(flag, dest=f.name, action="store_true", help=text)
            continue
        if meta["kind"]:
            parse = _PARSERS[meta["kind"]]
        else:
            hint = hints[f.name]
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            parse = type(args[0]) if typing.get_origin(hint) is Literal else (args[0] if args else hint)
        if f.default is not None:
            text += f" (default: {_shown(f.default).replace('%', '%%')})"
        g.add_argument(flag, dest=f.name, type=parse, choices=CHOICES.get(f.name), default=f.default, help=text)
    return groups


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF folder, hub name, or tiny:<family> (tests/demo)")
    p.add_argument("--tokenizer", help="tokenizer folder/name if it differs from --model")
    p.add_argument("--safety", default=DEFAULT_SHIPPED_SAFETY, help="safety data: prompt/response rows (refusals)")
    p.add_argument("--utility", default=DEFAULT_SHIPPED_UTILITY, help="utility data: instruction/input/output rows")
    p.add_argument("-o", "--output", required=True, help="mask file to write (.safetensors)")
    groups = add_config_arguments(p)
    groups[SELECTIONS].add_argument(
        "--task-data", metavar="FILE", help="sample of your training data (prompt/response rows): scores "
        "task-conflict units")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def config_from_args(args: argparse.Namespace) -> LocateConfig:
    """The :class:`LocateConfig` of the parsed options; invalid combinations are a :class:`DataError`."""
    try:
        return LocateConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LocateConfig)})
    except ValueError as exc:
        raise DataError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from ssah_plugin.io.model_path import check_model_path, check_output_file
    from ssah_plugin.locate.runner import locate_pretrained  # loads transformers: only when the command runs

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
