"""Overhead of ssah-plugin's enforcement: step time and memory with and without it (not a test).

Full fine-tuning of a *randomly initialised* model with SmolLM2-135M's architecture (LlamaConfig: hidden 576,
intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied embeddings), fp32 on CPU, AdamW (weight decay
0.1), grad-norm clipping 1.0, batch 2 x 128 random tokens, single process. The mask freezes a random 7.5% of the
units of every group (random units: the cost depends on how many slices are frozen, not on which).

One process, one model, one optimizer; the training step is the one ``transformers.Trainer`` runs (forward,
backward, ``clip_grad_norm_``, ``optimizer.step()``, [restore], ``zero_grad``), and the enforcement is the
:class:`~ssah_plugin.core.engine.FreezeEngine` that ``SSAHCallback`` builds (``build_enforcer``), i.e. exactly the
callback's per-step work: gradient hooks during backward plus ``after_step()`` in ``on_optimizer_step``. Variants
alternate *step by step* (off, post_accumulate, tensor, rotated each round) because other jobs share the CPU:

* ``off``: no enforcement (baseline).
* ``post_accumulate``: in-place zeroing of ``.grad`` (what ``grad_mode="auto"`` picks in a single process).
* ``tensor``: ``Tensor.register_hook`` masking (what ``auto`` picks with several processes).

Reported: per-variant step times, the ratio to ``off`` per round (neighbouring steps), the enforcement's own cost
timed in isolation on the real gradients (restore ``after_step()`` and the gradient masking ops, 20 calls each),
and memory: the snapshot size (exact bytes of the frozen slices; the only persistent extra memory) and the process
RSS right before / after attaching (``/proc/self/statm``). The tensor-hook mode additionally allocates one
temporary gradient-sized copy per frozen parameter while its hook runs (freed immediately).

    python benchmarks/bench_overhead.py --rounds 3 --steps 8 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
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


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ssah_plugin.hosts.enforce import build_enforcer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(smollm2_135m_config(), dtype=torch.float32)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    mask = build_mask(model, args.fraction, seed=2)
    variants = args.variants.split(",")
    rss_before = _rss_mib()
    engines = {}
    for v in variants:
        if v != "off":
            _, engines[v] = build_enforcer(mask, model, grad_mode=v)
    rss_after_plan = _rss_mib()

    def step(v: str) -> float:
        for name, eng in engines.items():
            if name != v and eng.attached:
                eng.detach()
        if v != "off" and not engines[v].attached:
            engines[v].attach()  # snapshot + hooks, outside the timed region
        ids = torch.randint(3, 49152, (args.batch, args.seq), generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if v != "off":
            engines[v].after_step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for v in variants:  # warm-up (allocator, AdamW state)
        for _ in range(args.warmup):
            print(f"warm-up {v}: {step(v):.2f} s", flush=True)
    rss_warm = _rss_mib()
    times: dict[str, list[list[float]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            times[v].append([])
        for i in range(args.steps):
            k = (r + i) % len(variants)
            for v in variants[k:] + variants[:k]:
                times[v][r].append(step(v))
            print(f"round {r} step {i}: " + ", ".join(f"{v} {times[v][r][-1]:.2f}s" for v in variants), flush=True)
    # enforcement cost in isolation, on real gradients
    ids = torch.randint(3, 49152, (args.batch, args.seq), generator=gen)
    for eng in engines.values():
        eng.detach()
    model(input_ids=ids, labels=ids).loss.backward()
    iso = {}
    for v, eng in engines.items():
        eng.attach()
        eng.detach()  # snapshot only; time the ops directly
        n = 20
        t0 = time.perf_counter()
        for _ in range(n):
            eng.after_step()
        restore = (time.perf_counter() - t0) / n * 1e3
        from ssah_plugin.core.engine import _small_op_threads

        t0 = time.perf_counter()
        for _ in range(n):
            for s in eng.slices:
                with _small_op_threads(s.param.device):
                    if v == "tensor":
                        s.param.grad.index_fill(s.axis, s.index, 0)
                    else:
                        s.param.grad.index_fill_(s.axis, s.index, 0)
        masking = (time.perf_counter() - t0) / n * 1e3
        iso[v] = {"restore_ms": restore, "grad_masking_ms": masking, "snapshot_bytes": eng.snapshot_bytes,
                  "frozen_elements": eng.frozen_elements, "frozen_tensors": len(eng.slices),
                  "max_drift_after_restore": eng.max_drift()}
    summary: dict = {}
    for v in variants:
        flat = [t for rnd in times[v] for t in rnd]
        summary[v] = {"step_s": _stats(flat)}
        if v != "off":
            per_round = [statistics.median(times[v][r]) / statistics.median(times["off"][r])
                         for r in range(args.rounds)]
            per_step = [a / b for ra, rb in zip(times[v], times["off"]) for a, b in zip(ra, rb)]
            summary[v].update(ratio_per_round=per_round, ratio_per_step=_stats(per_step), **iso[v])
            summary[v]["isolated_overhead_fraction"] = (
                (iso[v]["restore_ms"] + iso[v]["grad_masking_ms"]) / 1e3 / summary["off"]["step_s"]["median"])
    frozen = mask.summary()
    return {"params": n_params, "frozen_units": frozen["frozen_units"], "units": mask.n_units,
            "frozen_fraction": frozen["frozen_fraction"], "summary": summary, "times": times,
            "memory": {"rss_before_plan_mib": rss_before, "rss_after_plan_mib": rss_after_plan,
                       "rss_after_warmup_mib": rss_warm,
                       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="measured steps per variant and round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--fraction", type=float, default=0.075)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--results", default=str(HERE / "results" / "overhead"))
    args = p.parse_args(argv)
    res = run(args)
    import torch
    import transformers

    result = {
        "command": "python benchmarks/bench_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {"model": "random LlamaConfig = SmolLM2-135M architecture", "params": res["params"],
                  "batch": args.batch, "seq": args.seq, "precision": "fp32", "optimizer": "AdamW wd 0.1",
                  "max_grad_norm": 1.0, "mask": f"random {args.fraction:.1%} of the units of every group",
                  "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version(), "cpu_count": os.cpu_count(),
                  "load_average_at_end": os.getloadavg(),
                  "note": "CPU shared with other jobs; variants interleaved step by step, rotated each step"},
        **res,
    }
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(render_md(result))
    print(render_md(result))
    return 0


def render_md(result: dict) -> str:
    s, setup, mem = result["summary"], result["setup"], result["memory"]
    lines = [
        "# Enforcement overhead (full fine-tuning, SmolLM2-135M architecture, CPU)", "",
        f"Command: `{result['command']}`", "",
        f"Setup: {setup['model']} ({setup['params'] / 1e6:.1f} M params), batch {setup['batch']} x {setup['seq']} "
        f"tokens, {setup['precision']}, {setup['optimizer']}, clipping {setup['max_grad_norm']}, mask: "
        f"{setup['mask']} ({result['frozen_units']} of {result['units']} units, {result['frozen_fraction']:.2%}); "
        f"torch {setup['torch']}, transformers {setup['transformers']}, {setup['threads']} threads, "
        f"{setup['cpu_count']} CPUs. {setup['note']}; load average at the end {setup['load_average_at_end']}.", "",
        "| variant | median step (s) | min-max (s) | step ratio vs off: median per round | per-step ratio "
        "median [min, max] | restore ms/step (isolated) | grad masking ms/step (isolated) | isolated / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, d in s.items():
        st = d["step_s"]
        if v == "off":
            lines.append(f"| off | {st['median']:.3f} | {st['min']:.3f}-{st['max']:.3f} | 1 | 1 | - | - | - |")
            continue
        rr = ", ".join(f"{r:.3f}" for r in d["ratio_per_round"])
        ps = d["ratio_per_step"]
        lines.append(f"| {v} | {st['median']:.3f} | {st['min']:.3f}-{st['max']:.3f} | {rr} | {ps['median']:.3f} "
                     f"[{ps['min']:.3f}, {ps['max']:.3f}] | {d['restore_ms']:.2f} | {d['grad_masking_ms']:.2f} | "
                     f"{d['isolated_overhead_fraction']:.3%} |")
    on = next((d for v, d in s.items() if v != "off"), None)
    if on:
        lines += ["", f"Memory: snapshot {on['snapshot_bytes'] / 2**20:.2f} MiB per engine = exactly the frozen "
                  f"slices ({on['frozen_elements']:,} fp32 elements in {on['frozen_tensors']} tensors, "
                  f"{on['frozen_elements'] / result['params']:.2%} of the parameters). Process RSS "
                  f"{mem['rss_before_plan_mib']:.0f} MiB before planning, {mem['rss_after_plan_mib']:.0f} MiB "
                  f"after building the engines, {mem['rss_after_warmup_mib']:.0f} MiB after warm-up (AdamW state); "
                  f"peak RSS {mem['peak_rss_mib']:.0f} MiB (ru_maxrss; one process runs every variant, so the "
                  "peak is shared). Persistent extra memory is the snapshot only; the `tensor` mode adds one "
                  "transient gradient-sized copy per frozen tensor while its hook runs (at most "
                  "576 x 1536 x 4 B = 3.4 MiB at a time here).",
                  "", f"Frozen values after restore: max drift {max(d.get('max_drift_after_restore', 0) for d in s.values())}"
                  " (bitwise).", "",
                  "The end-to-end ratios are dominated by the noise of the shared CPU (compare `off`'s own min-max); "
                  "the isolated timings are the enforcement's actual cost per step.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
