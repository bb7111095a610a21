"""Multi-GPU TRL SFT or DPO with DeepSpeed ZeRO, safety-critical units frozen: the recipe (one added line).

    accelerate launch --config_file integrations/accelerate/zero3.yaml integrations/recipes/trl_zero.py \\
        --trainer sft --model HuggingFaceTB/SmolLM2-135M-Instruct --mask mask.safetensors --policy scu+cu6 \\
        --dataset my_chats.jsonl --output_dir out/sft-zero3

or, without accelerate, ``torchrun --nproc_per_node 8 integrations/recipes/trl_zero.py ... --deepspeed
integrations/deepspeed/zero2.json``. The dataset is JSONL: ``{"messages": [...]}`` rows for SFT,
``{"prompt": ..., "chosen": ..., "rejected": ...}`` rows for DPO (TRL's standard formats). ``--model tiny`` trains the
embedded tiny model with a mask built on the fly (smoke test, no download; used by the test suite).

The only ssah-plugin line is ``callbacks=[SSAHCallback(...)]``; everything else is an ordinary TRL script.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys


def _args(argv):
    p = argparse.ArgumentParser(description="TRL SFT/DPO under DeepSpeed ZeRO with ssah-plugin frozen units")
    p.add_argument("--trainer", choices=("sft", "dpo"), default="sft")
    p.add_argument("--model", required=True, help="hub id / local path, or 'tiny'")
    p.add_argument("--mask", help="mask file from `ssah-plugin locate` (not needed with --model tiny)")
    p.add_argument("--policy", default=None, help="which units to freeze (default: the mask's)")
    p.add_argument("--dataset", help="JSONL file (not needed with --model tiny)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (omit under accelerate launch --config_file)")
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (r=16) instead of all weights")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = _args(argv)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssah_plugin import Mask, SSAHCallback

    dtype = torch.bfloat16 if a.bf16 else torch.float32
    if a.model == "tiny":  # smoke test: tiny model, tiny tokenizer, a mask built from explicit units
        from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer

        model, tok = tiny_model("llama", dtype=dtype), tiny_tokenizer()
        mask = Mask.from_units(model, {"model.layers.0.mlp": [1, 2, 3], "model.layers.1.self_attn": range(8)})
        rows = [{"u": f"Question {i}: how do I sort a list?", "a": f"Use sorted(x) ({i})."} for i in range(32)]
        if a.trainer == "sft":
            data = [{"messages": [{"role": "user", "content": r["u"]}, {"role": "assistant", "content": r["a"]}]}
                    for r in rows]
        else:
            data = [{"prompt": [{"role": "user", "content": r["u"]}],
                     "chosen": [{"role": "assistant", "content": r["a"]}],
                     "rejected": [{"role": "assistant", "content": "No."}]} for r in rows]
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(a.model)
        mask = a.mask
        with open(a.dataset, encoding="utf-8") as f:
            data = [json.loads(line) for line in f if line.strip()]
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    common = dict(output_dir=a.output_dir, deepspeed=a.deepspeed, max_steps=a.max_steps, bf16=a.bf16,
                  per_device_train_batch_size=2, gradient_accumulation_steps=2, weight_decay=0.1,
                  gradient_checkpointing=a.model != "tiny", report_to=[], save_strategy="no", logging_steps=1,
                  use_cpu=not torch.cuda.is_available(), max_length=512 if a.model != "tiny" else 64)
    callbacks = [SSAHCallback(mask, policy=a.policy)]  # <- the one added line
    if a.trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(learning_rate=a.lr or 2e-5, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok,
                             peft_config=peft_config, callbacks=callbacks)
    else:
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(learning_rate=a.lr or 1e-6, **common)
        # A model built in-process has no hub name to load a reference from: give TRL a copy (tiny smoke test).
        ref_model = copy.deepcopy(model) if a.model == "tiny" and peft_config is None else None
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(data),
                             processing_class=tok, peft_config=peft_config, callbacks=callbacks)
    trainer.train()
    summary = callbacks[0].summary
    if trainer.is_world_process_zero():
        with open(f"{a.output_dir}/ssah_summary.json", "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}, f, indent=1)
    return 0 if summary.get("max_drift", 0.0) == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
