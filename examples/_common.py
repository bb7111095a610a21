"""Shared set-up for the examples: a real model from --model, or the embedded tiny default (no downloads)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="tiny:llama",
                   help="HF model folder / hub name, or tiny:<family> for a tiny random model (default)")
    p.add_argument("--mask", default=None, help="mask file; default: build one with locate on a few shipped samples")
    p.add_argument("--policy", default=None, help="which units to freeze (default: the mask's default)")
    p.add_argument("--out", default="runs/example", help="output folder")
    p.add_argument("--steps", type=int, default=5)
    return p


def load_model_and_tokenizer(name: str):
    if name.startswith("tiny:"):
        from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer

        return tiny_model(name.split(":", 1)[1]), tiny_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name)


def ensure_mask(args, model, tokenizer) -> str:
    """The mask to use: --mask if given, else locate on 16 safety / 16 utility shipped samples."""
    if args.mask:
        return args.mask
    from ssah_plugin.data import shipped_data_path
    from ssah_plugin.locate import LocateConfig, locate

    mask = locate(model, tokenizer, safety=str(shipped_data_path("safety_refusals.jsonl")),
                  utility=str(shipped_data_path("benign_instructions.jsonl")),
                  config=LocateConfig(max_samples=16, batch_size=8, max_length=192))
    path = Path(args.out) / "mask.safetensors"
    mask.save(path)
    return str(path)


def benign_messages(n: int) -> list[dict]:
    """Benign instruction/answer pairs from the shipped data, in TRL's conversational format."""
    from ssah_plugin.data import shipped_data_path

    rows = []
    with open(shipped_data_path("benign_instructions.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            user = r["instruction"] + (("\n\n" + r["input"]) if r["input"] else "")
            rows.append({"messages": [{"role": "user", "content": user},
                                      {"role": "assistant", "content": r["output"][:400]}]})
            if len(rows) >= n:
                break
    return rows
