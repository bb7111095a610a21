"""Overhead of SSAHCallback: step time and peak memory with and without it (not a test).

Full fine-tuning of a *randomly initialised* model with SmolLM2-135M's architecture (LlamaConfig: hidden 576,
intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings), transformers ``Trainer`` on CPU,
AdamW (weight decay 0.1), grad clipping 1.0, fp32, batch 2 x 128 random tokens, single process.
The mask freezes a random 7.5% of the units of every group (random units: the cost depends on how many slices are
frozen, not on which).

Variants, each run in its own fresh subprocess so that peak RSS is per variant:

* ``off``: no callback (baseline).
* ``post_accumulate``: ``SSAHCallback(..., grad_mode="post_accumulate")`` (in-place zeroing of ``.grad``; what
  ``grad_mode="auto"`` picks in a single process).
* ``tensor``: ``SSAHCallback(..., grad_mode="tensor")`` (``Tensor.register_hook``; what ``auto`` picks under DDP).

Repeats are interleaved (off, post_accumulate, tensor, then rotated) because other jobs share the CPU. Step time is
wall time from ``on_step_begin`` to ``on_step_end`` (forward, backward with hooks, clipping, optimizer step,
restore, zero_grad) after warm-up steps. Peak memory is the process's peak RSS (``resource.getrusage``,
``ru_maxrss``); the snapshot size is exact (bytes of the saved frozen slices). The restore itself is also timed in
isolation (``after_step`` called 50 times) because end-to-end differences of well under 1% are below the noise of a
shared machine.

    python benchmarks/bench_overhead.py --repeats 3 --steps 8 --warmup 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("off", "post_accumulate", "tensor")


def smollm2_135m_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0, head_dim=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_mask(model, fraction: float, seed: int):
    import torch

    from ssah_plugin import Mask, describe_units

    gen = torch.Generator().manual_seed(seed)
    units = {}
    for g in describe_units(model):
        k = int(round(fraction * g.n_units))
        units[g.name] = torch.randperm(g.n_units, generator=gen)[:k].tolist()
    return Mask.from_units(model, units)


def worker(args) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_135m_config(), dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    n_rows = args.batch * (args.warmup + args.steps)
    ids = torch.randint(3, 49152, (n_rows, args.seq), generator=gen).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids})

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    callbacks = [Timer()]
    ssah = None
    mask_info = {}
    if args.variant != "off":
        from ssah_plugin.callback import SSAHCallback

        mask = build_mask(model, args.fraction, seed=2)
        ssah = SSAHCallback(mask, grad_mode=args.variant)
        callbacks.append(ssah)
        mask_info = {"frozen_units": mask.summary()["frozen_units"], "units": mask.n_units,
                     "frozen_fraction": mask.frozen_fraction()}
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="ssah-bench-"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=1e-4, weight_decay=0.1, max_grad_norm=1.0,
        lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, callbacks=callbacks)
    trainer.train()
    out = {"variant": args.variant, "step_s": times[args.warmup:], "warmup_s": times[:args.warmup],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params": n_params, **mask_info}
    if ssah is not None:
        eng = ssah.enforcer
        out["snapshot_bytes"] = eng.snapshot_bytes
        out["frozen_elements"] = eng.frozen_elements
        out["frozen_tensors"] = len(eng.slices)
        out["max_drift"] = ssah.summary.get("max_drift")
        t0 = time.perf_counter()
        for _ in range(50):
            eng.after_step()
        out["restore_ms"] = (time.perf_counter() - t0) / 50 * 1e3
    Path(args.out).write_text(json.dumps(out))


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="measured steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--fraction", type=float, default=0.075)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--results", default=str(HERE / "results" / "overhead"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="off", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    variants = args.variants.split(",")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate to spread drift
            for v in order:
                out = os.path.join(tmp, f"{v}-{r}.json")
                cmd = [sys.executable, __file__, "--worker", "--variant", v, "--out", out,
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                       "--seq", str(args.seq), "--fraction", str(args.fraction), "--threads", str(args.threads)]
                subprocess.run(cmd, check=True)
                res = json.loads(Path(out).read_text())
                res["repeat"] = r
                runs.append(res)
                print(f"repeat {r} {v:>16}: median step {statistics.median(res['step_s']):.3f} s, "
                      f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    summary: dict = {}
    base = [x for x in runs if x["variant"] == "off"]
    for v in variants:
        rs = [x for x in runs if x["variant"] == v]
        steps = [s for x in rs for s in x["step_s"]]
        summary[v] = {"step_s": _stats(steps), "peak_rss_mib": _stats([x["peak_rss_mib"] for x in rs])}
        if v != "off" and base:
            # ratio per repeat (same repeat = neighbouring runs), then spread over repeats
            ratios = []
            for r in range(args.repeats):
                a = [x for x in rs if x["repeat"] == r]
                b = [x for x in base if x["repeat"] == r]
                if a and b:
                    ratios.append(statistics.median(a[0]["step_s"]) / statistics.median(b[0]["step_s"]))
            summary[v]["step_time_ratio_per_repeat"] = ratios
            summary[v]["step_time_ratio_median_of_all_steps"] = (
                summary[v]["step_s"]["median"] / summary["off"]["step_s"]["median"])
            summary[v]["peak_rss_delta_mib_median"] = (
                summary[v]["peak_rss_mib"]["median"] - summary["off"]["peak_rss_mib"]["median"])
            for k in ("snapshot_bytes", "frozen_elements", "frozen_tensors", "frozen_units", "units",
                      "frozen_fraction"):
                summary[v][k] = rs[0][k]
            summary[v]["restore_ms"] = _stats([x["restore_ms"] for x in rs])
            summary[v]["max_drift"] = max(x["max_drift"] for x in rs)
    import torch
    import transformers

    result = {
        "command": "python benchmarks/bench_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {"model": "random LlamaConfig = SmolLM2-135M architecture", "params": runs[0]["params"],
                  "batch": args.batch, "seq": args.seq, "precision": "fp32", "optimizer": "AdamW wd 0.1",
                  "max_grad_norm": 1.0, "mask": f"random {args.fraction:.1%} of the units of every group",
                  "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version(), "cpu_count": os.cpu_count(),
                  "note": "CPU shared with other jobs; variants interleaved and rotated per repeat"},
        "summary": summary, "runs": runs,
    }
    res_path = Path(args.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.with_suffix(".json").write_text(json.dumps(result, indent=1))
    res_path.with_suffix(".md").write_text(render_md(result))
    print(render_md(result))
    return 0


def render_md(result: dict) -> str:
    s, setup = result["summary"], result["setup"]
    lines = [
        "# SSAHCallback overhead (full fine-tuning, SmolLM2-135M architecture, CPU)", "",
        f"Command: `{result['command']}`", "",
        f"Setup: {setup['model']} ({setup['params'] / 1e6:.1f} M params), batch {setup['batch']} x {setup['seq']} "
        f"tokens, {setup['precision']}, {setup['optimizer']}, clipping {setup['max_grad_norm']}, mask: "
        f"{setup['mask']}; torch {setup['torch']}, transformers {setup['transformers']}, {setup['threads']} threads. "
        f"{setup['note']}.", "",
        "| variant | median step (s) | min-max step (s) | ratio vs off, per repeat | peak RSS (MiB) | "
        "restore (ms/step) |",
        "|---|---|---|---|---|---|",
    ]
    for v, d in s.items():
        ratios = ", ".join(f"{r:.3f}" for r in d.get("step_time_ratio_per_repeat", [])) or "1 (baseline)"
        restore = f"{d['restore_ms']['median']:.2f}" if "restore_ms" in d else "-"
        lines.append(f"| {v} | {d['step_s']['median']:.3f} | {d['step_s']['min']:.3f}-{d['step_s']['max']:.3f} | "
                     f"{ratios} | {d['peak_rss_mib']['median']:.0f} | {restore} |")
    on = next((d for v, d in s.items() if v != "off"), None)
    if on:
        lines += ["", f"Frozen: {on['frozen_units']} of {on['units']} units ({on['frozen_fraction']:.2%}), "
                  f"{on['frozen_elements']:,} weight elements in {on['frozen_tensors']} tensors; snapshot "
                  f"{on['snapshot_bytes'] / 2**20:.2f} MiB (exactly the frozen slices, fp32). Max drift of frozen "
                  f"values at the end of every run: {on['max_drift']}."]
    lines += ["", "Peak RSS is `ru_maxrss` of a fresh process per run (includes the model, gradients, AdamW state "
              "and activations); the difference between variants is within allocator noise unless it exceeds the "
              "snapshot size. Restore time is `after_step()` timed alone (50 calls).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
