"""``ssah-plugin verify``: check from the saved files that fine-tuning left the frozen units untouched (for CI).

Exit codes: 0 no frozen unit drifted beyond the tolerance, 1 drift, 2 usage or input error (unreadable mask or
checkpoint, missing tensors, mask for another model).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

HELP = "check that a fine-tuned checkpoint kept the mask's frozen units unchanged (exit 1 on drift)"
EPILOG = """\
examples:
  ssah-plugin verify --base meta-llama-2-7b-chat/ --tuned out/final/ --mask mask.safetensors
  ssah-plugin verify --base base/ --tuned out/lora-adapter/ --mask mask.safetensors --policy scu+cu6 --json

exit codes: 0 ok, 1 a frozen unit drifted beyond --tolerance, 2 usage or input error.
Both checkpoints are read lazily (safetensors, sharded or not), one tensor at a time.
"""


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="the model the mask was made for (folder or .safetensors)")
    parser.add_argument("--tuned", required=True,
                        help="the fine-tuned checkpoint (folder, .safetensors, or PEFT adapter folder)")
    parser.add_argument("--mask", required=True, help="mask file written by `ssah-plugin locate`")
    parser.add_argument("--policy", default=None, help="frozen set used in training (default: the mask's default)")
    parser.add_argument("--tolerance", type=_tolerance, default=0.0,
                        help="largest absolute drift accepted on a frozen unit (default 0: bit-exact)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--no-fingerprint-check", action="store_true",
                        help="accept a base whose weights differ from those the mask was made from")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ssah_plugin.errors import SSAHError
    from ssah_plugin.evaluation.verify import EXIT_ERROR, verify_checkpoint

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = verify_checkpoint(args.base, args.tuned, args.mask, policy=args.policy,
                                       tolerance=args.tolerance, check_fingerprint=not args.no_fingerprint_check,
                                       progress=not args.no_progress)
    except SSAHError as exc:
        if args.json:
            print(json.dumps({"ok": False, "exit_code": EXIT_ERROR, "error": str(exc)}, indent=2))
        print(f"ssah-plugin verify: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(report.to_json() if args.json else report.format_text())
    return report.exit_code
