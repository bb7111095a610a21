"""Helpers of the framework integration tests (Axolotl, LLaMA-Factory); the fixture is in ``conftest.py``.

Each framework runs in its own environment (``scripts/integration_envs.sh`` builds them); in any other environment
the tests that need it skip with the reason. The fixtures save a tiny Llama and its tokenizer to a folder (what the
frameworks load, like a downloaded checkpoint), write a small chat data set in two formats, and locate two masks with
ssah-plugin: one for that model and one for another checkpoint of the same architecture (the "wrong model" case).

The bitwise check reads the base and the tuned ``model.safetensors`` directly and builds its own dense boolean masks
from the mask's unit slices, independently of the freeze engine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

POLICY = "scu+cu6"


@dataclass
class TinyRun:
    root: Path
    base: Path  # model + tokenizer folder
    chat: Path  # {"messages": [...]} rows
    alpaca: Path  # {"instruction", "input", "output"} rows
    mask: Path  # made for `base`
    foreign_mask: Path  # same architecture, other weights


def _rows(n: int = 48) -> list[tuple[str, str]]:
    return [(f"Say the number {i}.", f"The number is {i}, and that is fine.") for i in range(n)]


def build_tiny_run(root: Path) -> TinyRun:
    from ssah_plugin import LocateConfig
    from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer
    from ssah_plugin.locate import locate

    root.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    cfg = LocateConfig(max_samples=16, max_length=128, progress=False)
    paths = {}
    for name, seed in (("base", 0), ("foreign", 1)):
        model = tiny_model("llama", seed=seed)
        folder = root / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        mask = locate(model, tok, config=cfg)
        paths[name] = mask.save(root / f"{name}-mask.safetensors")
    chat, alpaca = root / "chat.jsonl", root / "alpaca.jsonl"
    with open(chat, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                     + "\n" for q, a in _rows())
    with open(alpaca, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in _rows())
    return TinyRun(root=root, base=root / "base", chat=chat, alpaca=alpaca, mask=Path(paths["base"]),
                   foreign_mask=Path(paths["foreign"]))


#: Offline, and no telemetry: Axolotl sends usage events to PostHog unless told not to (in-process too, from
#: ``load_cfg``; its upload thread then keeps the interpreter from exiting where the network is unreachable).
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "WANDB_DISABLED": "true",
             "TOKENIZERS_PARALLELISM": "false"}


def framework_env() -> dict[str, str]:
    """The environment a framework's CLI runs in: this interpreter's bin first, offline, no telemetry, CPU."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(QUIET_ENV, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_cli(cmd: list[str], cwd: Path, log: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a framework command; its whole output goes to ``log`` (and is returned as ``.stdout``)."""
    proc = subprocess.run(cmd, cwd=cwd, env=framework_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, check=False)
    log.write_text(proc.stdout, encoding="utf-8")
    return proc


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


@dataclass
class FrozenReport:
    frozen_units: int
    frozen_elements: int
    frozen_changed: int  # frozen elements whose bits differ between base and tuned
    trainable_units: int
    trainable_units_moved: int
    other_tensors_changed: list[str]  # tensors without units (embeddings, norms, lm_head) that changed


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns as integers (so -0.0 != 0.0 and NaN payloads count)."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def frozen_report(base: Path, tuned: Path, mask_path: Path, policy: str = POLICY) -> FrozenReport:
    """Compare ``base`` and ``tuned`` checkpoints on the mask's units, bit for bit."""
    from safetensors.torch import load_file

    from ssah_plugin import Mask

    mask = Mask.load(mask_path)
    a = load_file(str(base / "model.safetensors"))
    b = load_file(str(tuned / "model.safetensors"))
    dense: dict[str, torch.Tensor] = {}
    frozen_units = trainable = moved = 0
    for group, frozen in zip(mask.groups, mask.frozen(policy)):
        for u in range(group.n_units):
            changed = False
            for s in group.slices:
                if s.name not in a:
                    raise AssertionError(f"{s.name} is not in the base checkpoint {base}")
                x, y = a[s.name].index_select(s.axis, s.index[u]), b[s.name].index_select(s.axis, s.index[u])
                changed = changed or not torch.equal(_bits(x), _bits(y))
                if frozen[u]:
                    m = dense.setdefault(s.name, torch.zeros_like(a[s.name], dtype=torch.bool))
                    m.index_fill_(s.axis, s.index[u], True)
            if frozen[u]:
                frozen_units += 1
            else:
                trainable += 1
                moved += int(changed)
    n_el = n_bad = 0
    for name, m in dense.items():
        bits_a, bits_b = _bits(a[name]), _bits(b[name])
        n_el += int(m.sum())
        n_bad += int(((bits_a != bits_b) & m).sum())
    unit_tensors = {s.name for g in mask.groups for s in g.slices}
    others = [k for k in a if k not in unit_tensors and k in b and not torch.equal(a[k], b[k])]
    return FrozenReport(frozen_units, n_el, n_bad, trainable, moved, others)


def check_merged_lora_run(run: TinyRun, proc: subprocess.CompletedProcess, out: Path) -> None:
    """A LoRA run finished and, merged into the base, kept every frozen unit bitwise while every other unit moved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert proc.returncode == 0, tail(proc.stdout)
    assert (out / "model" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(run.base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, out / "model").merge_and_unload()
    merged.save_pretrained(out / "merged")
    rep = frozen_report(run.base, out / "merged", run.mask)
    assert rep.frozen_units > 0
    assert rep.frozen_changed == 0, f"{rep.frozen_changed} of {rep.frozen_elements} frozen weights changed"
    assert rep.trainable_units_moved == rep.trainable_units, rep


def check_refused_before_training(proc: subprocess.CompletedProcess, out: Path) -> None:
    """A run with a mask for other weights stopped with the mismatch error before any optimizer step or save."""
    assert proc.returncode != 0
    assert "MaskMismatchError" in proc.stdout and "mask was made for other weights" in proc.stdout, tail(proc.stdout)
    assert "'loss'" not in proc.stdout  # no optimizer step was logged
    assert not (out / "model" / "model.safetensors").exists()
