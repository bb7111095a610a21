"""Fine-tune with TRL's SFTTrainer while the safety-critical units stay frozen: ONE added line.

    python examples/trl_sft.py                                  # tiny model, shipped data, seconds on a CPU
    python examples/trl_sft.py --model Qwen/Qwen2.5-0.5B-Instruct --mask mask.safetensors --steps 200
"""
from __future__ import annotations

import torch
from _common import base_parser, benign_messages, ensure_mask, load_model_and_tokenizer
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from ssah_plugin import SSAHCallback


def main(argv=None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    model, tokenizer = load_model_and_tokenizer(args.model)
    mask = ensure_mask(args, model, tokenizer)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    config = SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4,
                       learning_rate=1e-3, weight_decay=0.1, max_grad_norm=1.0, logging_steps=1, report_to=[],
                       bf16=False, gradient_checkpointing=False, save_strategy="no", use_cpu=True, max_length=256,
                       assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(benign_messages(64)),
                         callbacks=[SSAHCallback(mask, policy=args.policy)])  # <- the one added line
    trainer.train()

    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SSAHCallback))
    moved = sum(not torch.equal(p, base[n]) for n, p in model.named_parameters())
    print(f"frozen units: {cb.summary['frozen_units']} of {cb.summary['units']} "
          f"({100 * cb.summary['frozen_fraction']:.2f}%), max drift of frozen values: {cb.summary['max_drift']}, "
          f"tensors changed by training: {moved}")
    return 0 if cb.summary["max_drift"] == 0.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
