"""Memory and time of `ssah-plugin verify` on a ~270M-parameter random Llama (1.1 GB fp32, sharded).

Shows that verify never holds the model: peak memory of the verify process (a subprocess, measured with
getrusage / VmHWM) against the size of the checkpoint and against loading it with from_pretrained.

    python benchmarks/bench_verify.py --out benchmarks/results/verify [--keep /tmp/bench_verify]

Writes verify.json and verify.md into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
mode = sys.argv[1]
if mode == "verify":
    from ssah_plugin.evaluation.verify import verify_checkpoint
    r = verify_checkpoint(sys.argv[2], sys.argv[3], sys.argv[4], progress=False)
    extra = {"ok": r.ok, "frozen_units": r.total.frozen_units, "tensors_checked": r.tensors_checked}
elif mode == "load":
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(sys.argv[2])
    total = sum(float(p.sum()) for p in m.parameters())  # touch every weight (a forward pass would)
    extra = {"params": sum(p.numel() for p in m.parameters())}
else:
    import torch, transformers, safetensors, ssah_plugin.evaluation.verify  # imports only
    extra = {}
hwm = anon = None
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) / 1024
    if line.startswith("RssAnon:"):
        anon = int(line.split()[1]) / 1024
print(json.dumps(dict(extra, mode=mode, seconds=time.perf_counter() - t0, peak_rss_mib=hwm, rss_anon_mib_at_end=anon,
                      maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/verify")
    ap.add_argument("--keep", default=None, help="folder for the checkpoints (reused if present)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_verify_"))
    base, tuned, mask_path = work / "base", work / "tuned", work / "mask.safetensors"
    if not (base / "model.safetensors.index.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from ssah_plugin.core.mask import Mask

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **CONFIG))
        model.save_pretrained(base, max_shard_size="200MB")
        # freeze 7.5% of each group's units (like scu+cu6), then change every other unit in the tuned copy
        groups = Mask.empty_for(model).groups
        frozen = {g.name: range(0, g.n_units, 13) for g in groups}
        mask = Mask.from_units(model, frozen)
        mask.save(mask_path)
        with torch.no_grad():
            for g in groups:
                keep = torch.zeros(g.n_units, dtype=torch.bool)
                keep[list(frozen[g.name])] = True
                for s in g.slices:
                    p = model.get_submodule(s.module).get_parameter(s.param)
                    idx = s.index[~keep].reshape(-1)
                    p.index_add_(s.axis, idx, torch.full_like(p.index_select(s.axis, idx), 1e-3))
        model.save_pretrained(tuned, max_shard_size="200MB")
        del model
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    rows = {"imports": [], "verify": [], "load": []}
    for _ in range(args.repeats):  # interleaved
        rows["imports"].append(child("imports"))
        rows["verify"].append(child("verify", str(base), str(tuned), str(mask_path)))
        rows["load"].append(child("load", str(base)))
    assert all(r["ok"] for r in rows["verify"]), "the untouched frozen units should verify"
    summary = {k: {m: [round(r[m], 1) for r in v] for m in ("seconds", "peak_rss_mib")} for k, v in rows.items()}
    result = {"checkpoint_bytes": size, "config": CONFIG, "runs": rows, "summary": summary,
              "command": "python " + " ".join(sys.argv), "cpu_count": os.cpu_count()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "verify.json").write_text(json.dumps(result, indent=2))
    lines = [f"# verify: memory and time ({size / 2**20:.0f} MiB fp32 checkpoint, 12 layers, sharded 200MB)", "",
             f"Command: `{result['command']}` (2 shared CPU cores; other jobs were running; {args.repeats} interleaved "
             "repeats, each in a fresh process)", "",
             "| process | seconds (each run) | peak RSS MiB (each run) |", "|---|---|---|"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v['seconds']} | {v['peak_rss_mib']} |")
    lines += ["", "Times include the imports. `imports` = python + torch + transformers + ssah_plugin.evaluation.verify "
              "imported, nothing else. "
              "`verify` = verify_checkpoint(base, tuned, mask) on the "
              f"{rows['verify'][0]['tensors_checked']} unit-bearing tensors of each checkpoint (all read). `load` = "
              "AutoModelForCausalLM.from_pretrained(base) with every weight read once, for comparison.",
              "Peak RSS is VmHWM of the process (includes memory-mapped file pages it touched)."]
    (out / "verify.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
