"""Preference tuning with TRL's DPOTrainer; the reference model is never touched, the frozen units never move.

    python examples/trl_dpo.py
"""
from __future__ import annotations

import copy

import torch
from _common import base_parser, benign_messages, ensure_mask, load_model_and_tokenizer
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from ssah_plugin import SSAHCallback


def preference_pairs(n: int) -> list[dict]:
    """Benign pairs: the reference answer is preferred over another row's answer."""
    rows = benign_messages(n + 1)
    return [{"prompt": [r["messages"][0]],
             "chosen": [r["messages"][1]],
             "rejected": [rows[i + 1]["messages"][1]]} for i, r in enumerate(rows[:n])]


def main(argv=None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    model, tokenizer = load_model_and_tokenizer(args.model)
    mask = ensure_mask(args, model, tokenizer)
    ref_model = copy.deepcopy(model)  # with PEFT, pass peft_config instead and no ref_model
    ref_before = {n: p.detach().clone() for n, p in ref_model.named_parameters()}

    config = DPOConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=1e-3,
                       weight_decay=0.1, logging_steps=1, report_to=[], bf16=False, gradient_checkpointing=False,
                       save_strategy="no", use_cpu=True, max_length=256)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(preference_pairs(32)),
                         callbacks=[SSAHCallback(mask, policy=args.policy)])  # <- the one added line
    trainer.train()

    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SSAHCallback))
    ref_same = all(torch.equal(p, ref_before[n]) for n, p in ref_model.named_parameters())
    print(f"max drift of frozen values: {cb.summary['max_drift']}; reference model unchanged: {ref_same}")
    return 0 if cb.summary["max_drift"] == 0.0 and ref_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
