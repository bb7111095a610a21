"""The prepared GPU check: bitwise tests on CUDA, then the plugin's step-time overhead (not a test; see README.md).

1. Tests: ``SSAH_TEST_DEVICE=cuda pytest tests/test_device_bitwise.py`` (Trainer + SSAHCallback, SSAHOptimizer
   custom loop, LoRA; fp32 and bf16; bitwise against hand references), then every other test marked ``cuda`` or
   ``multi_gpu`` in ``tests/``. Counts and the JUnit files are written to the output folder.
2. Overhead: full fine-tuning steps of randomly initialised models of SmolLM2-135M's and Qwen2.5-0.5B's size (configs
   below, no download), bf16 autocast with fp32 master weights (what ``Trainer(bf16=True)`` runs), fused AdamW
   (weight decay 0.1), grad-norm clipping 1.0, batch 8 x 1024 random tokens, one process. The mask freezes a random
   fraction of the units of every group: 7.5% (a typical located set) and 90% (policies that freeze most weights,
   such as ``scu+cu`` or ``ru-only``). Variants run interleaved step by step in one process, order rotated each step:
   ``off`` (no enforcement), ``device`` (snapshot on the training device, the default) and, when the engine has the
   option, ``pinned_cpu`` (snapshot in pinned host memory, restored with non-blocking copies). Each variant's engine
   is what ``SSAHCallback`` builds (``build_enforcer``): gradient masking during backward plus ``after_step()``
   right after ``optimizer.step()``. Reported per variant: median step time, the median over rounds of the ratio to
   ``off`` in the same round, the restore and masking costs timed alone on real gradients, the snapshot's size
   and device memory, and the largest drift of a frozen value after the variant's own step (must be 0).

``--smoke`` runs the same code on CPU with a tiny model and a few steps (< 1 minute): it proves the script works and
measures nothing worth reporting. Results: ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (``OUT`` defaults to
``benchmarks/results/gpu``; with ``--smoke`` to a temporary folder).

    bash benchmarks/gpu/run.sh            # GPU machine
    bash benchmarks/gpu/run.sh --smoke    # anywhere
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Published configs (hidden sizes, layers, heads, vocabulary, tied embeddings) of the two models, for random init.
MODELS = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         use_sliding_window=False),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
                 max_position_embeddings=256),
}
FRACTIONS = (0.075, 0.9)
#: The engine option that keeps the snapshot in pinned host memory, as (keyword of build_enforcer, value).
PINNED_OPTION = ("snapshot_device", "cpu")


# ---------------------------------------------------------------------------------------------- 1. tests
def _junit_counts(path: Path) -> dict:
    if not path.is_file():
        return {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "note": "no JUnit file"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["skip_reasons"] = sorted({sk.get("message", "") for tc in root.iter("testcase") for sk in tc.iter("skipped")})
    return out


def cuda_test_files() -> list[str]:
    """Test files (besides the bitwise one) that use the ``cuda`` / ``multi_gpu`` markers or ``torch_device``.

    Only those are handed to pytest, so modules needing packages the GPU machine lacks (``datasets``, ``trl``) are
    not imported."""
    pattern = re.compile(r"pytest\.mark\.(cuda|multi_gpu)\b|\btorch_device\b")
    return sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py")
                  if f.name != "test_device_bitwise.py" and pattern.search(f.read_text(encoding="utf-8")))


def run_tests(out: Path, smoke: bool, timeout: float) -> list[dict]:
    env = dict(os.environ, SSAH_TEST_DEVICE="cpu" if smoke else "cuda", PYTHONPATH=str(ROOT))
    steps = [("bitwise", ["tests/test_device_bitwise.py"] + (["-k", "custom_loop"] if smoke else []))]
    others = cuda_test_files()
    if not smoke and others:
        steps.append(("cuda-marked", [*others, "-m", "cuda or multi_gpu"]))
    results = [] if smoke or others else [{"step": "cuda-marked", "command": None, "returncode": None, "ok": True,
                                           "seconds": 0.0, "tests": 0, "failures": 0, "errors": 0, "skipped": 0,
                                           "passed": 0, "note": "no test file besides test_device_bitwise.py uses "
                                           "the cuda / multi_gpu markers or torch_device"}]
    for name, argv in steps:
        junit = out / f"tests_{name}.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}", *argv]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", str(e)[-3000:]
        print(tail, flush=True)
        # pytest exit 5: nothing collected (no cuda-marked test besides the bitwise file): reported, not a failure
        results.append({"step": name, "command": " ".join(cmd[1:]), "returncode": rc, "ok": rc in (0, 5),
                        "seconds": round(time.perf_counter() - t0, 1), **_junit_counts(junit), "output_tail": tail})
    return results


# ---------------------------------------------------------------------------------------------- 2. overhead
def build_model(name: str, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(MODELS[name])
    cfg = AutoConfig.for_model(kw.pop("model_type"), pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.train()


def random_mask(model, fraction: float, seed: int):
    import torch

    from ssah_plugin import Mask, describe_units

    gen = torch.Generator().manual_seed(seed)
    units = {g.name: torch.randperm(g.n_units, generator=gen)[:int(round(fraction * g.n_units))].tolist()
             for g in describe_units(model)}
    return Mask.from_units(model, units)


def snapshot_variants() -> dict[str, dict]:
    """``{variant: build_enforcer keywords}``; ``pinned_cpu`` only when the engine offers the option."""
    from ssah_plugin.hosts.enforce import build_enforcer

    out = {"device": {}}
    key, value = PINNED_OPTION
    if key in inspect.signature(build_enforcer).parameters:
        out["pinned_cpu"] = {key: value}
    return out


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def measure(name: str, fraction: float, args, device, variants: dict[str, dict]) -> dict:
    import torch

    from ssah_plugin.hosts.enforce import build_enforcer

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    model = build_model(name, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=cuda)
    mask = random_mask(model, fraction, seed=2)
    engines, memory = {}, {}
    for v, kw in variants.items():
        sync()
        before = torch.cuda.memory_allocated() if cuda else 0
        _, engines[v] = build_enforcer(mask, model, grad_mode="post_accumulate", **kw)
        engines[v].attach()
        engines[v].detach()  # snapshot kept; hooks off until the variant's steps
        sync()
        memory[v] = {"snapshot_bytes": int(engines[v].snapshot_bytes),
                     "snapshot_device": str(engines[v]._snapshots[0].device) if engines[v]._snapshots else None,
                     "device_bytes_added": (torch.cuda.memory_allocated() - before) if cuda else None}
    names = ["off", *engines]
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    drift: dict[str, float] = {}

    def step(v: str) -> float:
        for other, eng in engines.items():
            if other != v and eng.attached:
                eng.detach()
        if v != "off" and not engines[v].attached:
            engines[v].attach()  # a new snapshot + hooks, outside the timed region
        ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen).to(device)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if v != "off":
            engines[v].after_step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        if v != "off":
            drift[v] = max(drift.get(v, 0.0), engines[v].max_drift())
        return dt

    for v in names:
        for _ in range(args.warmup):
            step(v)
    times: dict[str, list[list[float]]] = {v: [] for v in names}
    t_start = time.perf_counter()
    rounds = 0
    for r in range(args.rounds):
        for v in names:
            times[v].append([])
        for i in range(args.steps):
            k = (r + i) % len(names)
            for v in names[k:] + names[:k]:
                times[v][r].append(step(v))
        rounds += 1
        if time.perf_counter() - t_start > args.row_budget_s:
            break
    # the enforcement's own cost, timed alone on real gradients
    for eng in engines.values():
        eng.detach()
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen).to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    alone = {}
    for v, eng in engines.items():
        idx = [s.index.to(s.param.device) for s in eng.slices]
        sync()
        t0 = time.perf_counter()
        for _ in range(20):
            eng.after_step()
        sync()
        restore = (time.perf_counter() - t0) / 20 * 1e3
        t0 = time.perf_counter()
        for _ in range(20):
            for s, i in zip(eng.slices, idx):
                s.param.grad.index_fill_(s.axis, i, 0)
        sync()
        alone[v] = {"restore_ms": restore, "masking_ms": (time.perf_counter() - t0) / 20 * 1e3}
    flat = {v: [t for rr in times[v] for t in rr] for v in names}
    row = {"model": name, "frozen_fraction": fraction, "rounds": rounds, "steps_per_round": args.steps,
           "params": sum(p.numel() for p in model.parameters()),
           "frozen_elements": int(next(iter(engines.values())).frozen_elements) if engines else 0, "variants": {}}
    for v in names:
        ratios = [statistics.median(times[v][r]) / statistics.median(times["off"][r]) for r in range(rounds)]
        row["variants"][v] = {"step_s": _stats(flat[v]), "ratio_to_off_median": statistics.median(ratios),
                              "ratios_per_round": ratios, **memory.get(v, {}), **alone.get(v, {}),
                              **({"max_drift_after_own_step": drift.get(v)} if v != "off" else {})}
    return row


def environment(device) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(device), "cuda": torch.version.cuda, "platform": platform.platform()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


# ---------------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    e = result["environment"]
    title = (f"SMOKE on {e['device']}: proves the script runs, measures nothing" if result["smoke"]
             else e.get("gpu", e["device"]))
    lines = [f"# GPU check ({title})",
             "", f"torch {e['torch']} (CUDA {e['cuda']}), transformers {e['transformers']}, Python {e['python']}, "
             f"commit {e.get('commit') or 'unknown'}; total {result['seconds']:.0f} s.", "", "## Tests", "",
             "| step | result | passed | failed | errors | skipped | s |", "|---|---|---|---|---|---|---|"]
    for t in result["tests"]:
        lines.append(f"| {t['step']} | {'ok' if t['ok'] else 'FAILED (rc ' + str(t['returncode']) + ')'} | "
                     f"{t.get('passed', 0)} | {t['failures']} | {t['errors']} | {t['skipped']} | {t['seconds']} |")
    for t in result["tests"]:
        for reason in t.get("skip_reasons", []):
            lines.append(f"\n* skipped in {t['step']}: {reason}")
    lines += ["", "## Step-time overhead", "", result["setup"], "",
              "| model | frozen | variant | median step (ms) | ratio to off | restore alone (ms) | masking alone (ms) "
              "| snapshot (MiB) | snapshot on | device memory added (MiB) | max drift |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["overhead"]:
        for v, d in row["variants"].items():
            mib = (lambda b: "" if b is None else f"{b / 2**20:.1f}")
            ms = (lambda t: "" if t is None else f"{t:.3f}")
            lines.append(
                f"| {row['model']} | {row['frozen_fraction']:.1%} | {v} | {d['step_s']['median'] * 1e3:.2f} | "
                f"{d['ratio_to_off_median']:.4f} | {ms(d.get('restore_ms'))} | {ms(d.get('masking_ms'))} | "
                f"{mib(d.get('snapshot_bytes'))} | "
                f"{d.get('snapshot_device') or ''} | {mib(d.get('device_bytes_added'))} | "
                f"{d.get('max_drift_after_own_step', '')} |")
    lines += ["", *[f"* {n}" for n in result["notes"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps (< 1 minute)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--models", default=None, help="comma list of " + ", ".join(MODELS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--row-budget-s", type=float, default=None, help="stop adding rounds to a row after this")
    args = p.parse_args(argv)
    smoke_defaults = dict(models="tiny", batch=2, seq=32, warmup=1, rounds=2, steps=2, row_budget_s=5.0)
    gpu_defaults = dict(models="smollm2-135m,qwen2.5-0.5b", batch=8, seq=1024, warmup=3, rounds=5, steps=10,
                        row_budget_s=40.0)
    for k, v in (smoke_defaults if args.smoke else gpu_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    default_out = Path(tempfile.gettempdir()) / "ssah_gpu_smoke" if args.smoke else ROOT / "benchmarks/results/gpu"
    out = args.out or default_out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    sys.path.insert(0, str(ROOT))
    notes = []
    tests = [] if args.skip_tests else run_tests(out, args.smoke, timeout=40 if args.smoke else 270)
    variants = snapshot_variants()
    if "pinned_cpu" not in variants:
        notes.append(f"pinned_cpu row skipped: build_enforcer has no {PINNED_OPTION[0]!r} option in this build")
    if args.smoke:
        torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        for fraction in FRACTIONS:
            print(f"overhead: {name}, {fraction:.1%} frozen", flush=True)
            rows.append(measure(name, fraction, args, device, variants))
            gc.collect()  # the row's model, optimizer and snapshots
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = {"smoke": args.smoke, "environment": environment(device), "tests": tests, "overhead": rows,
              "setup": (f"bf16 autocast, fp32 master weights, AdamW (fused on CUDA), clip 1.0, batch {args.batch} x "
                        f"{args.seq} random tokens, warm-up {args.warmup} per variant, up to {args.rounds} rounds x "
                        f"{args.steps} interleaved steps per variant; grad_mode post_accumulate."),
              "notes": notes, "seconds": time.perf_counter() - t0}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    print(f"results: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0 if all(t["ok"] for t in tests) else 1


if __name__ == "__main__":
    sys.exit(main())
