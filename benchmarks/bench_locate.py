"""Benchmark ``locate`` on a SmolLM2-135M-sized random Llama: wall time, peak memory, ratio to plain forwards.

Each measurement runs in its own subprocess (clean peak RSS), and the modes are interleaved across repeats (the
order rotates) because other jobs share the CPU. Modes:

* ``locate``    : ``ssah_plugin.locate.locate`` on the in-memory model (both data sets, statistics hooks, scores,
                  classes; tokenisation included).
* ``forward``   : plain ``model(input_ids, attention_mask)`` (with the LM head) over exactly the same batches.
* ``body``      : the decoder without the LM head (what locate runs) over the same batches, for reference.
* ``layerwise`` : ``locate_layerwise`` on the same model saved as sharded safetensors (one layer in memory).

Usage (the results in benchmarks/results/locate.* were produced by the command in their ``command`` field):

    python benchmarks/bench_locate.py --samples 128 --max-length 256 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("locate", "forward", "body", "layerwise")


def smollm2_sized_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                       tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_model():
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(smollm2_sized_config(), dtype=torch.float32).eval()


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from ssah_plugin.data.rows import encode_pairs, load_pairs
    from ssah_plugin.io.tiny import tiny_tokenizer
    from ssah_plugin.locate import DEFAULT_SHIPPED_SAFETY, DEFAULT_SHIPPED_UTILITY, LocateConfig, batches, locate

    tok = tiny_tokenizer()
    cfg = LocateConfig(max_samples=args.samples, batch_size=args.batch_size, max_length=args.max_length,
                       progress=False, device="cpu")
    enc = []
    for src in (DEFAULT_SHIPPED_SAFETY, DEFAULT_SHIPPED_UTILITY):
        enc.append(encode_pairs(tok, load_pairs(src, max_samples=args.samples, seed=cfg.seed),
                                max_length=args.max_length))
    tokens = sum(len(e.input_ids) for es in enc for e in es)
    counted = sum(sum(e.count) for es in enc for e in es)
    if mode == "layerwise":
        from ssah_plugin.locate import locate_layerwise

        before = rss_mib()
        c0, t0 = time.process_time(), time.perf_counter()
        mask = locate_layerwise(args.checkpoint, tok, safety=DEFAULT_SHIPPED_SAFETY, utility=DEFAULT_SHIPPED_UTILITY,
                                config=cfg)
        wall = time.perf_counter() - t0
        extra = {"units": mask.n_units}
    else:
        model = build_model()
        before = rss_mib()
        c0, t0 = time.process_time(), time.perf_counter()
        if mode == "locate":
            mask = locate(model, tok, config=cfg)
            extra = {"units": mask.n_units}
        else:
            fn = model if mode == "forward" else model.base_model
            with torch.no_grad():
                for es in enc:
                    for ids, att, _ in batches(es, args.batch_size, 0):
                        fn(input_ids=ids, attention_mask=att, use_cache=False)
            extra = {}
        wall = time.perf_counter() - t0
    return {"mode": mode, "wall_s": wall, "cpu_s": time.process_time() - c0, "peak_rss_mib": peak_mib(),
            "rss_before_mib": before, "tokens": tokens, "counted_tokens": counted, **extra}


def interleaved(args: argparse.Namespace) -> dict:
    """One process, ``args.threads`` threads: forward / body / locate statistics alternated ``args.rounds`` times on
    the same batches (CPU time is less sensitive than wall time to the other jobs on the machine)."""
    import torch

    torch.set_num_threads(args.threads)
    from ssah_plugin.core.units import describe_units
    from ssah_plugin.data.rows import encode_pairs, load_pairs
    from ssah_plugin.io.tiny import tiny_tokenizer
    from ssah_plugin.locate import DEFAULT_SHIPPED_SAFETY, DEFAULT_SHIPPED_UTILITY, batches, collect_stats

    tok = tiny_tokenizer()
    enc = [encode_pairs(tok, load_pairs(src, max_samples=args.samples), max_length=args.max_length)
           for src in (DEFAULT_SHIPPED_SAFETY, DEFAULT_SHIPPED_UTILITY)]
    model = build_model()
    groups = describe_units(model)

    def plain(fn):
        with torch.no_grad():
            for es in enc:
                for ids, att, _ in batches(es, args.batch_size, 0):
                    fn(input_ids=ids, attention_mask=att, use_cache=False)

    fns = {"forward": lambda: plain(model), "body": lambda: plain(model.base_model),
           "locate_stats": lambda: [collect_stats(model, groups, es, batch_size=args.batch_size, pad_id=0,
                                                  progress=False) for es in enc]}
    times: dict[str, list] = {k: [] for k in fns}
    for r in range(args.rounds):
        for name in (list(fns)[r % 3:] + list(fns)[:r % 3]):
            c0, t0 = time.process_time(), time.perf_counter()
            fns[name]()
            times[name].append({"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0})
            print(f"round {r} {name:<13} cpu {times[name][-1]['cpu_s']:.2f} s", flush=True)
    ratio = {}
    for ref in ("forward", "body"):
        vals = [a["cpu_s"] / b["cpu_s"] for a, b in zip(times["locate_stats"], times[ref])]
        ratio[f"locate_stats_over_{ref} (cpu)"] = {"median": statistics.median(vals), "min": min(vals),
                                                   "max": max(vals)}
    return {"times": times, "ratios": ratio,
            "tokens": sum(len(e.input_ids) for es in enc for e in es)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=128, help="rows of each data set")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "locate"))
    p.add_argument("--interleaved", action="store_true",
                   help="single process: alternate forward / body / locate statistics (--rounds times), CPU time")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return 0
    if args.interleaved:
        res = interleaved(args)
        res["command"] = "python benchmarks/bench_locate.py " + " ".join(sys.argv[1:])
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        lines = ["# locate statistics overhead, interleaved in one process", "", f"Command: `{res['command']}`", "",
                 f"{res['tokens']} tokens per pass; {args.threads} thread(s); CPU time per pass (seconds):", "",
                 "| pass | " + " | ".join(f"round {i}" for i in range(args.rounds)) + " |",
                 "|---|" + "---|" * args.rounds]
        for name, ts in res["times"].items():
            lines.append(f"| {name} | " + " | ".join(f"{t['cpu_s']:.2f}" for t in ts) + " |")
        lines += ["", "| ratio | median | min..max |", "|---|---|---|"]
        lines += [f"| {k} | {v['median']:.2f} | {v['min']:.2f}..{v['max']:.2f} |" for k, v in res["ratios"].items()]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    modes = [m for m in args.modes.split(",") if m]
    tmp = Path(tempfile.mkdtemp(prefix="bench_locate_"))
    runs: list[dict] = []
    try:
        if "layerwise" in modes:
            build_model().save_pretrained(tmp / "ckpt", max_shard_size="200MB")
        for r in range(args.repeats):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for mode in order:
                cmd = [sys.executable, __file__, "--child", mode, "--samples", str(args.samples), "--max-length",
                       str(args.max_length), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                       "--checkpoint", str(tmp / "ckpt")]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(out.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"child {mode} failed")
                res = json.loads(line[7:])
                res["repeat"] = r
                runs.append(res)
                print(f"repeat {r} {mode:<9} {res['wall_s']:8.1f} s  peak RSS {res['peak_rss_mib']:7.0f} MiB",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {}
    for mode in modes:
        walls = [x["wall_s"] for x in runs if x["mode"] == mode]
        cpus = [x["cpu_s"] for x in runs if x["mode"] == mode]
        peaks = [x["peak_rss_mib"] for x in runs if x["mode"] == mode]
        summary[mode] = {"wall_s_median": statistics.median(walls), "wall_s_min": min(walls),
                         "wall_s_max": max(walls), "cpu_s_median": statistics.median(cpus),
                         "peak_rss_mib_max": max(peaks)}
    ratios = {}
    for num in ("locate", "layerwise"):
        for ref in ("forward", "body"):
            if num not in summary or ref not in summary:
                continue
            for key in ("wall_s", "cpu_s"):
                vals = [a[key] / b[key] for a in runs if a["mode"] == num
                        for b in runs if b["mode"] == ref and b["repeat"] == a["repeat"]]
                ratios[f"{num}_over_{ref} ({key[:-2]})"] = {"median": statistics.median(vals), "min": min(vals),
                                                            "max": max(vals)}
    import platform

    import torch

    result = {
        "command": "python benchmarks/bench_locate.py " + " ".join(sys.argv[1:]),
        "model": "random LlamaConfig(hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152), "
                 "fp32, ~135M parameters",
        "data": f"{args.samples} safety + {args.samples} utility rows (shipped), max_length {args.max_length}, "
                f"batch {args.batch_size}, tiny byte-BPE tokenizer",
        "tokens": runs[0]["tokens"], "counted_tokens": runs[0]["counted_tokens"],
        "machine": f"{platform.machine()}, {os.cpu_count()} visible CPUs, torch {torch.__version__}, "
                   f"{args.threads} threads, shared with other jobs",
        "summary": summary, "ratios": ratios, "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["# locate benchmark", "", f"Command: `{result['command']}`", "", f"Model: {result['model']}.",
             f"Data: {result['data']}; {result['tokens']} tokens, {result['counted_tokens']} counted (response).",
             f"Machine: {result['machine']}.", "",
             "| mode | wall s (median) | min..max | CPU s (median) | peak RSS MiB |", "|---|---|---|---|---|"]
    for mode, s in summary.items():
        lines.append(f"| {mode} | {s['wall_s_median']:.1f} | {s['wall_s_min']:.1f}..{s['wall_s_max']:.1f} | "
                     f"{s['cpu_s_median']:.1f} | {s['peak_rss_mib_max']:.0f} |")
    lines += ["", "| ratio | median | min..max |", "|---|---|---|"]
    for k, v in ratios.items():
        lines.append(f"| {k} | {v['median']:.2f} | {v['min']:.2f}..{v['max']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
