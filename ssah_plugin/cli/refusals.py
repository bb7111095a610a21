"""``ssah-plugin refusals``: collect the base model's own refusals once, for :func:`ssah_plugin.with_refusal_replay`."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "collect the aligned model's own refusals to harmful prompts (for refusal replay during fine-tuning)"
EPILOG = """examples:
  ssah-plugin refusals --model Qwen/Qwen2.5-0.5B-Instruct -o refusals.jsonl
  ssah-plugin refusals --model ./my-chat-model --prompts my_harmful_prompts.jsonl --max-prompts 200 -o refusals.jsonl
  ssah-plugin refusals --model tiny:llama --max-prompts 4 -o /tmp/refusals.jsonl

Then, in the training script: train_dataset = with_refusal_replay(train_dataset, "refusals.jsonl", share=0.05).
Default prompts: the 420 AdvBench 'calib' rows shipped with the package (never the 100 'eval' rows, which stay
for evaluation). Replies are kept where the keyword judge finds a refusal phrase; they are written to the file
only, never to the log.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the aligned base model: local HF folder, hub name, or tiny:<family>")
    p.add_argument("--prompts", default="shipped:advbench.jsonl",
                   help="harmful prompts (JSONL/CSV/Parquet with a prompt column; default: AdvBench calib rows)")
    p.add_argument("--max-prompts", type=int, default=None, help="use at most this many prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto",
                   help="auto (default): this rank's GPU under torchrun, else cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("-o", "--output", required=True, help="JSONL file to write (prompt, response rows)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    # imported here so that `ssah-plugin refusals --help` does not load torch / transformers
    from ssah_plugin.data.rows import load_rows, prompts_from_rows
    from ssah_plugin.errors import DataError
    from ssah_plugin.io.models import load_model
    from ssah_plugin.recipes.replay import collect_refusals, save_refusals

    out = Path(args.output)
    if out.is_dir():
        raise DataError(f"--output {str(out)!r} is a folder; give a file name such as {str(out / 'refusals.jsonl')!r}")
    if out.exists() and not args.force:
        raise DataError(f"--output {str(out)!r} exists; pass --force to overwrite it")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise DataError(f"--max-prompts must be >= 1, got {args.max_prompts}")
    rows = load_rows(args.prompts)
    if any(r.get("split") == "eval" for r in rows):  # AdvBench: the eval rows are for evaluation only
        rows = [r for r in rows if r.get("split") != "eval"]
        if not rows:
            raise DataError("the prompts file holds only AdvBench 'eval' rows, which are kept for evaluation")
    prompts = prompts_from_rows(rows, where="harmful prompts")[: args.max_prompts]
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    pairs = collect_refusals(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             progress=not args.no_progress)
    save_refusals(pairs, out)
    print(f"{len(pairs)} refusals out of {len(prompts)} prompts written to {out}")
    return 0
