"""A plain PyTorch / accelerate training loop: wrap the optimizer, nothing else changes.

    python examples/custom_loop.py
"""
from __future__ import annotations

import torch
from _common import base_parser, benign_messages, ensure_mask, load_model_and_tokenizer
from accelerate import Accelerator

from ssah_plugin import SSAHOptimizer


def main(argv=None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    model, tokenizer = load_model_and_tokenizer(args.model)
    mask = ensure_mask(args, model, tokenizer)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    optimizer = SSAHOptimizer(optimizer, model, mask, policy=args.policy)  # <- the one added line
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=args.steps)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in benign_messages(16)]
    model.train()
    for step in range(args.steps * 2):
        batch = tokenizer(texts[(2 * step) % 16:(2 * step) % 16 + 2], return_tensors="pt", padding=True,
                          truncation=True, max_length=128)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with accelerator.accumulate(model):
            loss = model(**batch, labels=labels).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    drift = optimizer.optimizer.max_drift() if hasattr(optimizer.optimizer, "max_drift") else None
    print(f"last loss {loss.item():.4f}; max drift of frozen values: {drift}")
    return 0 if drift == 0.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
