"""``ssah-plugin eval``: attack success rate and benign loss of one or several checkpoints, side by side; with
``--attack prefill --attack framing --depth --over-refusal`` (or ``--deep``) also the deep safety evaluation of
:mod:`ssah_plugin.evaluation.deep_eval` (the first ``--model`` is the base).

Harmful prompts and replies are never printed; only counts and rates. ``--save-responses`` writes them to
``--out``/responses.jsonl for inspection (harmful text: keep that file out of logs and CI artefacts).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

HELP = "evaluate checkpoints: attack success rate on harmful prompts and loss on held-out benign data"
EPILOG = """\
examples:
  ssah-plugin eval --model Qwen/Qwen2.5-0.5B-Instruct --model out/ft-plain --model out/ft-frozen --out eval/
  ssah-plugin eval --model tiny:llama --limit 4 --max-new-tokens 16 --out /tmp/eval   # smoke test, no download
  ssah-plugin eval --model BASE --model TUNED --attack prefill --attack framing --depth --over-refusal --out eval/
  ssah-plugin eval --model BASE --model TUNED --deep --prefill-k 0,5,full --framings my_framings.json --out eval/

data: --harmful advbench:eval (default, AdvBench ids 0-99) | advbench:calib | advbench:all | FILE(.jsonl/.json/.txt)
      --benign  benign:heldout (default, shipped rows i % 10 == 9) | benign:all | FILE(.jsonl/.json)
writes (with --out): eval.md, eval.json, eval.png (+ deep.png with a deep part, + responses.jsonl with
--save-responses).
deep part: the first --model is the base (its refusal direction and greedy replies are the reference; it stays
loaded while the others are evaluated); every 0/1 outcome is paired with the base's by an exact McNemar test.
"""


def _ks(text: str) -> tuple:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "full":
            out.append("full")
            continue
        try:
            k = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"K must be an integer or 'full', got {part!r}") from None
        if k < 0:
            raise argparse.ArgumentTypeError(f"K must be >= 0, got {k}")
        out.append(k)
    if not out:
        raise argparse.ArgumentTypeError("give at least one K")
    return tuple(out)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="M",
                        help="checkpoint to evaluate: local folder, hub name, or tiny:<family>; repeat to compare")
    parser.add_argument("--name", action="append", default=None, metavar="LABEL",
                        help="label for each --model in the report (same order; default: the model argument)")
    parser.add_argument("--harmful", default=None, metavar="DATA", help="harmful prompts (default: advbench:eval)")
    parser.add_argument("--benign", default=None, metavar="DATA", help="benign pairs (default: benign:heldout)")
    parser.add_argument("--max-new-tokens", type=_positive, default=64, help="new tokens per reply (default 64; "
                        "Wei et al. used 256)")
    parser.add_argument("--limit", type=_positive, default=None,
                        help="use the first N harmful prompts and N benign pairs")
    parser.add_argument("--batch-size", type=_positive, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--max-length", type=_positive, default=512, help="token limit of a benign pair (default 512)")
    parser.add_argument("--system", default=None, help="system prompt put before every prompt (default: none)")
    parser.add_argument("--judge", default="wei2024_test_prefixes",
                        choices=["wei2024_test_prefixes", "qi2023_keyword_eval_test_prefixes"],
                        help="refusal phrase list (default: Wei et al.'s)")
    parser.add_argument("--min-words", type=int, default=20,
                        help="shorter replies count as refusals (default 20; 0: off)")
    parser.add_argument("--exact-apostrophes", action="store_true",
                        help="do not map curly apostrophes to ' before matching (the original papers' behaviour)")
    parser.add_argument("--no-safety", action="store_true", help="skip the harmful-prompt evaluation")
    parser.add_argument("--no-utility", action="store_true", help="skip the benign loss")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="load dtype")
    parser.add_argument("--device", default=None, help="device to run on (default: this rank's GPU under torchrun, "
                        "else cuda if available, else cpu)")
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="device_map for from_pretrained instead of --device (e.g. auto: spread a large model "
                        "over the GPUs)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write eval.md, eval.json and eval.png here")
    parser.add_argument("--no-plots", action="store_true",
                        help="write no PNG (without matplotlib, the [plot] extra, they are skipped with a warning)")
    parser.add_argument("--save-responses", action="store_true",
                        help="also write the full harmful prompts and replies to DIR/responses.jsonl")
    deep = parser.add_argument_group("deep safety evaluation (the first --model is the base)")
    deep.add_argument("--attack", action="append", choices=["prefill", "framing"], default=None,
                      help="prefill: ASR vs K pre-filled target tokens; framing: ASR under motive framings and the "
                      "flip rate (repeat for both)")
    deep.add_argument("--depth", action="store_true",
                      help="judge-free signals: refusal log-odds, reply KL to the base, refusal direction kept")
    deep.add_argument("--over-refusal", action="store_true", help="false-refusal rate on held-out benign prompts")
    deep.add_argument("--deep", action="store_true", help="all of the above")
    deep.add_argument("--prefill-k", type=_ks, default=None, metavar="K,K,...",
                      help="prefill lengths in target tokens (default 0,5,10,20,full)")
    deep.add_argument("--prefill-short", choices=["cap", "error"], default="cap",
                      help="a target shorter than K: prefill it whole and count it (cap, default) or stop (error)")
    deep.add_argument("--framings", default=None, metavar="FILE",
                      help="JSON file of extra framings ([{id, template with {prompt}}]); added to the shipped ones")
    deep.add_argument("--framing-ids", default=None, metavar="ID,ID,...", help="use only these framings")
    deep.add_argument("--kl-tokens", type=_positive, default=16, help="reply positions for the KL (default 16)")
    deep.add_argument("--refusal-max-new-tokens", type=_positive, default=48,
                      help="new tokens per benign reply for the over-refusal rate (default 48)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    # imported here, not at module level, so that `ssah-plugin eval --help` does not load torch / transformers
    from ssah_plugin.errors import DataError
    from ssah_plugin.evaluation.attacks import prefill_inputs
    from ssah_plugin.evaluation.deep_eval import deep_evaluate, paired_vs_base
    from ssah_plugin.evaluation.evaluate import compare
    from ssah_plugin.evaluation.judge import RefusalJudge
    from ssah_plugin.evaluation.report import deep_markdown, markdown_table, results_json, write_report
    from ssah_plugin.io.model_path import check_model_path
    from ssah_plugin.io.models import load_model, resolve_device

    if args.name is not None and len(args.name) != len(args.model):
        raise DataError(f"got {len(args.name)} --name for {len(args.model)} --model; give one label per model")
    if args.no_safety and args.no_utility:
        raise DataError("--no-safety and --no-utility together leave nothing to evaluate")
    if args.save_responses and not args.out:
        raise DataError("--save-responses needs --out DIR")
    if args.min_words < 0:
        raise DataError("--min-words must be >= 0")
    if args.device is not None and args.device_map is not None:
        raise DataError("give --device or --device-map, not both")
    list(map(check_model_path, args.model))  # every --model checked before any is loaded
    where = ({"device_map": args.device_map} if args.device_map is not None
             else {"device": str(resolve_device(args.device or "auto"))})
    names = args.name or args.model
    judge = RefusalJudge(args.judge, min_words=args.min_words, normalize_apostrophes=not args.exact_apostrophes)
    cfg, data = _deep_setup(args, judge)
    results, base = [], None
    for name, spec in zip(names, args.model):
        model, tok = load_model(spec, dtype=args.dtype, **where)
        if cfg is not None and "prefill" in cfg.attacks:  # K vs targets with this tokenizer, before any generation
            for k in cfg.ks:
                prefill_inputs(tok, data["harmful"], data["targets"], k, cfg.system, cfg.prefill_short)
        results += compare([(name, model, tok)], harmful=args.harmful, benign=args.benign, limit=args.limit,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_length=args.max_length,
                           system=args.system, judge=judge, progress=not args.no_progress,
                           safety=not args.no_safety, utility=not args.no_utility)
        results[-1]["model"] = spec
        if cfg is not None:
            results[-1]["deep"], state = deep_evaluate(model, tok, data, cfg, base)
            if base is None:
                base, base_row = state, results[-1]
                results[-1]["paired_vs_base"] = []
            else:
                results[-1]["paired_vs_base"] = paired_vs_base(base_row["deep"], results[-1]["deep"])
                del state
        del model, tok
    if args.json:
        print(json.dumps(results_json(results), indent=2))
    else:
        print(markdown_table(results))
        if cfg is not None:
            print(deep_markdown(results))
    if args.out:
        with warnings.catch_warnings():  # the warning about responses.jsonl is printed below, once
            warnings.filterwarnings("ignore", message=".*holds full replies to harmful prompts", category=UserWarning)
            files = write_report(results, args.out, responses=args.save_responses, plots=not args.no_plots)
        print("wrote " + ", ".join(str(p) for p in files.values()), file=sys.stderr)
        if args.save_responses:
            print(f"warning: {files['responses']} contains full replies to harmful prompts; keep it out of logs "
                  "and CI artefacts", file=sys.stderr)
    return 0


def _deep_setup(args: argparse.Namespace, judge):
    """The deep-evaluation config and data, or ``(None, None)`` when no deep option is given (checked before any
    model is loaded, so that a bad data file or option fails at once)."""
    from ssah_plugin.errors import DataError
    from ssah_plugin.evaluation.attacks import DEFAULT_KS, load_framings
    from ssah_plugin.evaluation.deep_eval import DeepConfig, load_deep_data

    attacks = ("prefill", "framing") if args.deep else tuple(dict.fromkeys(args.attack or ()))
    depth, over = args.deep or args.depth, args.deep or args.over_refusal
    if not (attacks or depth or over):
        for flag in ("prefill_k", "framings", "framing_ids"):
            if getattr(args, flag) is not None:
                raise DataError(f"--{flag.replace('_', '-')} needs --attack or --deep")
        return None, None
    framings = None
    if "framing" in attacks:
        ids = [x.strip() for x in args.framing_ids.split(",") if x.strip()] if args.framing_ids else None
        framings = load_framings(args.framings, ids=ids)
    cfg = DeepConfig(attacks=attacks, ks=args.prefill_k or DEFAULT_KS, prefill_short=args.prefill_short,
                     framings=framings, depth=depth,
                     over_refusal=over, kl_tokens=args.kl_tokens, max_new_tokens=args.max_new_tokens,
                     refusal_max_new_tokens=args.refusal_max_new_tokens, batch_size=args.batch_size,
                     system=args.system, judge=judge, progress=not args.no_progress)
    return cfg, load_deep_data(args.harmful, args.benign, args.limit, targets="prefill" in attacks)
