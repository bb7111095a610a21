"""``ssah-plugin ablate``: remove one class of units and measure refusals and benign loss (the paper's Table 1)."""
from __future__ import annotations

import argparse
import json

HELP = "zero one class of units (SCU/UCU/CU/RU) and compare refusal rate and benign loss with the dense model"
EPILOG = """examples:
  ssah-plugin ablate --model ./my-chat-model --mask mask.safetensors --class SCU
  ssah-plugin ablate --model ./my-chat-model --mask mask.safetensors --class SCU --class UCU --class RU \\
      --n-harmful 100 --n-benign 100 --max-new-tokens 128 --json > table1.json
  ssah-plugin ablate --model tiny:llama --mask /tmp/tiny.mask.safetensors --class SCU --n-harmful 4 --n-benign 4

A unit is removed by zeroing its column of the output projection (down_proj / o_proj), which removes exactly its
contribution; --all-slices also zeroes its input rows. The model on disk is never changed: units are zeroed in
memory and restored after each row.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF folder, hub name, or tiny:<family>")
    p.add_argument("--mask", required=True, help="mask file written by ssah-plugin locate")
    p.add_argument("--class", dest="classes", action="append", choices=("SCU", "UCU", "CU", "RU"), required=True,
                   help="class to remove (repeat for several rows)")
    p.add_argument("--harmful", default=None, help="harmful prompts (default advbench:eval, the first 100 AdvBench)")
    p.add_argument("--benign", default=None, help="benign pairs (default benign:heldout)")
    p.add_argument("--n-harmful", type=int, default=100, help="harmful prompts used (default 100)")
    p.add_argument("--n-benign", type=int, default=100, help="benign pairs used (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply length (Wei et al. use 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--system", help="system prompt for every conversation")
    p.add_argument("--all-slices", action="store_true",
                   help="zero every slice the mask lists for a unit (its input rows too) instead of only its column of "
                        "down_proj/o_proj; with grouped-query attention this also hits value rows shared with other "
                        "heads' units, i.e. removes more than the class")
    p.add_argument("--no-fingerprint-check", action="store_true", help="allow a mask made for other weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ssah_plugin.core.mask import Mask
    from ssah_plugin.data.eval_sets import load_benign, load_harmful
    from ssah_plugin.io.model_path import check_model_path
    from ssah_plugin.io.models import load_model, resolve_device
    from ssah_plugin.locate.ablation import ablation_study

    check_model_path(args.model)
    mask = Mask.load(args.mask)
    device = resolve_device(args.device)
    model, tok = load_model(args.model, dtype=args.dtype or ("float32" if device.type == "cpu" else None),
                            device=str(device))
    mask.validate(model, check_fingerprint=not args.no_fingerprint_check)
    harmful = load_harmful(args.harmful, limit=args.n_harmful)
    benign = load_benign(args.benign, limit=args.n_benign)
    rows = ablation_study(model, tok, mask, args.classes, harmful, benign, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, output_only=not args.all_slices, system=args.system,
                          progress=not args.no_progress)
    if args.json:
        print(json.dumps({"model": args.model, "mask": args.mask, "output_only": not args.all_slices, "rows": rows},
                         indent=2))
        return 0
    print(f"{'model':<8} {'removed':>16} {'ASR':>7} {'refusal':>8} {'benign loss':>12}")
    for r in rows:
        removed = f"{r['units_removed']} ({r['fraction_removed']:.1%})"
        print(f"{r['model']:<8} {removed:>16} {r['asr']:>7.1%} {r['refusal_rate']:>8.1%} {r['benign_loss']:>12.4f}")
    print(f"({rows[0]['n_harmful']} harmful prompts, keyword judge; {rows[0]['n_benign']} benign pairs)")
    return 0
