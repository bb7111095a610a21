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
per step measured where it runs (timing hooks around the engine's gradient hooks during the real backward; a timer
around ``after_step()`` right after the real ``optimizer.step()``), the same ops timed in isolation on the last
gradients (20 calls each) next to the ops the engine used before (``index_copy_`` / ``index_fill_``), and memory: the snapshot size (exact bytes of the frozen slices; the only persistent extra memory) and the process
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
        k = round(fraction * g.n_units)
        units[g.name] = torch.randperm(g.n_units, generator=gen)[:k].tolist()
    return Mask.from_units(model, units)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def _timing_hooks(eng, mode: str, acc: list) -> tuple[list, list]:
    """Hooks that bracket the engine's gradient hooks on each frozen parameter: register the first list's before
    ``eng.attach()`` and the second's after it (hooks of one parameter run in registration order); their sum over a
    backward, in ``acc[0]``, is the time the engine's masking took in that backward, in the real cache state."""
    params = list({id(s.param): s.param for s in eng.slices if s.param.requires_grad}.values())
    started: dict = {}

    def start(key):
        def hook(*_):
            started[key] = time.perf_counter()
        return hook

    def end(key):
        def hook(*_):
            acc[0] += time.perf_counter() - started.pop(key)
        return hook

    reg = (lambda p, f: p.register_hook(f)) if mode == "tensor" else \
        (lambda p, f: p.register_post_accumulate_grad_hook(f))
    return [lambda p=p: reg(p, start(id(p))) for p in params], [lambda p=p: reg(p, end(id(p))) for p in params]


def _isolated(eng, mode: str, n: int = 20) -> dict:
    """The engine's per-step ops timed alone, n calls each, on the real gradients (cold caches), next to the ops
    the engine used before (``index_copy_`` / ``index_fill_``, out of place in ``tensor`` mode) on the same slices in
    the same process."""
    import torch

    from ssah_plugin.core.engine import _small_op_threads, zero_slice

    out = {}
    t0 = time.perf_counter()
    for _ in range(n):
        eng.after_step()
    out["restore_ms"] = (time.perf_counter() - t0) / n * 1e3
    dev = eng.slices[0].param.device
    with _small_op_threads(dev):
        t0 = time.perf_counter()
        for _ in range(n):
            for s in eng.slices:
                zero_slice(s.param.grad.clone() if mode == "tensor" else s.param.grad, s.axis, s.index)
        out["grad_masking_ms"] = (time.perf_counter() - t0) / n * 1e3
        snaps = [s.param.detach().index_select(s.axis, s.index) for s in eng.slices]
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(n):
                for s, v in zip(eng.slices, snaps):
                    s.param.index_copy_(s.axis, s.index, v)
            out["legacy_restore_ms"] = (time.perf_counter() - t0) / n * 1e3
        t0 = time.perf_counter()
        for _ in range(n):
            for s in eng.slices:
                if mode == "tensor":
                    s.param.grad.index_fill(s.axis, s.index, 0)
                else:
                    s.param.grad.index_fill_(s.axis, s.index, 0)
        out["legacy_grad_masking_ms"] = (time.perf_counter() - t0) / n * 1e3
    return out


def _alternatives(eng, n: int = 5) -> dict:
    """Other exact ways to write the frozen slices, timed like the restore on the same slices, split by slice kind
    (row slices: axis 0 of a row-major weight; column slices: axis 1), plus two references: a contiguous copy of the
    snapshot (the "copy-speed limit") and one in-place pass over the whole tensors that hold column slices."""
    import torch

    from ssah_plugin.core.engine import _small_op_threads

    slices = [s for s in eng.slices if s.param.dim() == 2]
    snaps = [s.param.detach().index_select(s.axis, s.index) for s in slices]
    flat = []  # row-major positions of the frozen elements, in index_select order: one int64 per element
    for s in slices:
        pos = torch.arange(s.param.numel()).view(s.param.shape)
        flat.append(pos.index_select(s.axis, s.index).reshape(-1))
    copies = [v.clone() for v in snaps]

    def index_copy(s, v, f, c):
        s.param.index_copy_(s.axis, s.index, v)

    def index_put_axis_first(s, v, f, c):
        s.param.movedim(s.axis, 0).index_put_((s.index,), v.movedim(s.axis, 0))

    def put_flat(s, v, f, c):
        s.param.put_(f, v.reshape(-1))

    def snapshot_copy(s, v, f, c):
        c.copy_(v)

    def whole_tensor_pass(s, v, f, c):
        s.param.mul_(1.0)

    out = {}
    with torch.no_grad(), _small_op_threads(slices[0].param.device):
        for name, op in (("index_copy_ (engine)", index_copy), ("index_put_ on an axis-first view",
                                                                 index_put_axis_first),
                         ("put_ with one int64 position per element", put_flat), ("contiguous copy of the snapshot", snapshot_copy),
                         ("one in-place pass over the whole tensors", whole_tensor_pass)):
            t = {"rows": 0.0, "cols": 0.0}
            for _ in range(n):
                for s, v, f, c in zip(slices, snaps, flat, copies):
                    t0 = time.perf_counter()
                    op(s, v, f, c)
                    t["rows" if s.axis == 0 else "cols"] += time.perf_counter() - t0
            out[name] = {k: x / n * 1e3 for k, x in t.items()}
    return out


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
    in_situ: dict[str, dict[str, list[float]]] = {v: {"restore_ms": [], "grad_masking_ms": []} for v in engines}
    timing: list = []
    masked = [0.0]

    def switch(v: str) -> None:
        """Only variant ``v``'s hooks (and its timing hooks) on; snapshot + hooks outside the timed region."""
        for h in timing:
            h.remove()
        timing.clear()
        for eng in engines.values():
            if eng.attached:
                eng.detach()
        if v != "off":
            before, after = _timing_hooks(engines[v], v, masked)
            timing.extend(f() for f in before)
            engines[v].attach()
            timing.extend(f() for f in after)

    def step(v: str, record: bool) -> float:
        switch(v)
        ids = torch.randint(3, 49152, (args.batch, args.seq), generator=gen)
        masked[0] = 0.0
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if v != "off":
            t1 = time.perf_counter()
            engines[v].after_step()
            restore = time.perf_counter() - t1
        opt.zero_grad(set_to_none=True)
        total = time.perf_counter() - t0
        if v != "off" and record:
            in_situ[v]["restore_ms"].append(restore * 1e3)
            in_situ[v]["grad_masking_ms"].append(masked[0] * 1e3)
        return total

    for v in variants:  # warm-up (allocator, AdamW state)
        for _ in range(args.warmup):
            print(f"warm-up {v}: {step(v, False):.2f} s", flush=True)
    rss_warm = _rss_mib()
    times: dict[str, list[list[float]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            times[v].append([])
        for i in range(args.steps):
            k = (r + i) % len(variants)
            for v in variants[k:] + variants[:k]:
                times[v][r].append(step(v, True))
            print(f"round {r} step {i}: " + ", ".join(f"{v} {times[v][r][-1]:.2f}s" for v in variants), flush=True)
    switch("off")
    # enforcement cost in isolation, on real gradients
    ids = torch.randint(3, 49152, (args.batch, args.seq), generator=gen)
    model(input_ids=ids, labels=ids).loss.backward()
    iso: dict = {}
    alternatives: dict = {}
    for v, eng in engines.items():
        eng.attach()
        eng.detach()  # snapshot only; time the ops directly
        if not iso:
            alternatives = _alternatives(eng)
        iso[v] = {**_isolated(eng, v), "snapshot_bytes": eng.snapshot_bytes, "frozen_elements": eng.frozen_elements,
                  "frozen_tensors": len(eng.slices), "max_drift_after_restore": eng.max_drift()}
    summary: dict = {}
    off_median = statistics.median([t for rnd in times["off"] for t in rnd]) if "off" in times else float("nan")
    for v in variants:
        flat = [t for rnd in times[v] for t in rnd]
        summary[v] = {"step_s": _stats(flat)}
        if v != "off":
            per_round = [statistics.median(times[v][r]) / statistics.median(times["off"][r])
                         for r in range(args.rounds)]
            per_step = [a / b for ra, rb in zip(times[v], times["off"]) for a, b in zip(ra, rb)]
            situ = {k: _stats(xs) for k, xs in in_situ[v].items()}
            summary[v].update(ratio_per_round=per_round, ratio_per_step=_stats(per_step), in_situ=situ, **iso[v])
            summary[v]["in_situ_overhead_fraction"] = (
                (situ["restore_ms"]["median"] + situ["grad_masking_ms"]["median"]) / 1e3 / off_median)
            summary[v]["isolated_overhead_fraction"] = (
                (iso[v]["restore_ms"] + iso[v]["grad_masking_ms"]) / 1e3 / off_median)
            summary[v]["legacy_isolated_overhead_fraction"] = (
                (iso[v]["legacy_restore_ms"] + iso[v]["legacy_grad_masking_ms"]) / 1e3 / off_median)
    frozen = mask.summary()
    return {"params": n_params, "frozen_units": frozen["frozen_units"], "units": mask.n_units,
            "frozen_fraction": frozen["frozen_fraction"], "summary": summary, "alternatives": alternatives,
            "times": times,
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
        (f"Setup: {setup['model']} ({setup['params'] / 1e6:.1f} M params), batch {setup['batch']} x {setup['seq']} "
         f"tokens, {setup['precision']}, {setup['optimizer']}, clipping {setup['max_grad_norm']}, mask: "
         f"{setup['mask']} ({result['frozen_units']} of {result['units']} units, {result['frozen_fraction']:.2%}); "
         f"torch {setup['torch']}, transformers {setup['transformers']}, {setup['threads']} threads, "
         f"{setup['cpu_count']} CPUs. {setup['note']}; load average at the end {setup['load_average_at_end']}."), "",
        ("The plugin's own work per step is timed where it runs: the gradient masking by timing hooks registered "
         "around the engine's hooks on every frozen parameter (during the real backward), the restore around "
         "`after_step()` right after the real `optimizer.step()`. Isolated: the same ops repeated 20 times on the "
         "last gradients (cold caches), and, in the same process on the same slices, the ops the engine used "
         "before (`index_copy_` / `index_fill_`)."), "",
        ("| variant | median step (s) | min-max (s) | step ratio vs off: median per round | restore ms (in situ, "
         "median) | grad masking ms (in situ, median) | **in situ / step** | isolated restore + masking ms | "
         "isolated / step | before: `index_copy_` + `index_fill_` ms (isolated) | before / step |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, d in s.items():
        st = d["step_s"]
        if v == "off":
            lines.append(f"| off | {st['median']:.3f} | {st['min']:.3f}-{st['max']:.3f} | 1 | - | - | - | - | - | - "
                         "| - |")
            continue
        rr = ", ".join(f"{r:.3f}" for r in d["ratio_per_round"])
        situ = d["in_situ"]
        lines.append(
            f"| {v} | {st['median']:.3f} | {st['min']:.3f}-{st['max']:.3f} | {rr} | "
            f"{situ['restore_ms']['median']:.2f} | {situ['grad_masking_ms']['median']:.2f} | "
            f"**{d['in_situ_overhead_fraction']:.3%}** | {d['restore_ms']:.2f} + {d['grad_masking_ms']:.2f} | "
            f"{d['isolated_overhead_fraction']:.3%} | {d['legacy_restore_ms']:.2f} + "
            f"{d['legacy_grad_masking_ms']:.2f} | {d['legacy_isolated_overhead_fraction']:.3%} |")
    on = next((d for v, d in s.items() if v != "off"), None)
    if on:
        drift = max(d.get("max_drift_after_restore", 0) for d in s.values())
        lines += [
            "", (f"Memory: snapshot {on['snapshot_bytes'] / 2**20:.2f} MiB per engine = exactly the frozen slices "
                 f"({on['frozen_elements']:,} fp32 elements in {on['frozen_tensors']} tensors, "
                 f"{on['frozen_elements'] / result['params']:.2%} of the parameters). Process RSS "
                 f"{mem['rss_before_plan_mib']:.0f} MiB before planning, {mem['rss_after_plan_mib']:.0f} MiB after "
                 f"building the engines, {mem['rss_after_warmup_mib']:.0f} MiB after warm-up (AdamW state); peak RSS "
                 f"{mem['peak_rss_mib']:.0f} MiB (ru_maxrss; one process runs every variant, so the peak is shared). "
                 "Persistent extra memory is the snapshot only; the `tensor` mode adds one transient gradient-sized "
                 "copy per frozen tensor while its hook runs (at most 576 x 1536 x 4 B = 3.4 MiB at a time here)."),
            "", f"Frozen values after restore: max drift {drift} (bitwise).", "",
            ("The end-to-end ratios are dominated by the noise of the shared CPU (compare `off`'s own min-max); the "
             "in-situ timings are the enforcement's actual cost per step."), ""]
    alt = result.get("alternatives") or {}
    if alt:
        lines += ["## Other exact ways to write the frozen slices (isolated, one intra-op thread, ms per step)", "",
                  "| op | row slices (axis 0) | column slices (axis 1) | total |", "|---|---|---|---|"]
        lines += [f"| {k} | {d['rows']:.2f} | {d['cols']:.2f} | {d['rows'] + d['cols']:.2f} |" for k, d in alt.items()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
