"""One rank of the refusal-replay check under DeepSpeed ZeRO-2 (launched by ``test_replay_zero.py``).

The Trainer trains one epoch on 30 SFT rows with ``with_refusal_replay`` mixing in 3 refusal rows (share 0.1) and
``SSAHCallback`` freezing the worker's units. Each rank records the sequences its dataloader served (so the test
can check that the ranks together served every replayed row) and the frozen values' drift on the master weights
and the model copy (``worker.measure``). Scenarios ``replay-z2-fp32`` / ``replay-z2-bf16``; the scaffolding
(markers, errors, resets, barriers) is ``worker.main``.
"""
from __future__ import annotations

import sys

import torch
import worker as w  # this folder's shared worker (the script's folder is first on sys.path)

REFUSALS = [("bad request one", "I'm sorry, but I can't help with that."),
            ("bad request two", "I cannot assist with that."),
            ("bad request three", "I won't help with this.")]


def run(sc: w.Scenario) -> dict:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from ssah_plugin import SSAHCallback, with_refusal_replay
    from ssah_plugin.data.rows import sft_examples
    from ssah_plugin.io.tiny import tiny_tokenizer

    model, mask, ref, full = w.build(torch.bfloat16 if sc.bf16 else torch.float32)
    tok = tiny_tokenizer()
    pairs = [(r["prompt"], r["answer"]) for r in w.chat_rows(30)[:30]]
    user = sft_examples(tok, pairs, max_length=64)
    ds = with_refusal_replay(Dataset.from_list(user), REFUSALS, share=0.1, tokenizer=tok, max_length=64)
    served: list[list[int]] = []

    class Spy(Trainer):
        def training_step(self, model, inputs, *a, **k):
            for row, att in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
                served.append([t for t, m in zip(row, att) if m])
            return super().training_step(model, inputs, *a, **k)

    args = TrainingArguments(output_dir=sc.tmp, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, num_train_epochs=1, learning_rate=w.LR,
                             weight_decay=w.WD, max_grad_norm=1.0, bf16=sc.bf16, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=0, use_cpu=w.BACKEND != "nccl", ddp_backend=w.BACKEND,
                             remove_unused_columns=False, deepspeed=w.ds_config(sc.stage), logging_steps=1)
    cb = SSAHCallback(mask)
    trainer = Spy(model=model, args=args, train_dataset=ds, callbacks=[cb],
                  data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True))
    trainer.train()
    res = w.measure(trainer.model_wrapped.module if hasattr(trainer.model_wrapped, "module") else model,
                    mask, ref, full, zero=True, enforcer=cb.enforcer)
    replay_ids = [r["input_ids"] for r in sft_examples(tok, REFUSALS, max_length=64)]
    res.update(rows=len(ds), n_replay=sum(1 for i in range(len(ds)) if ds[i]["input_ids"] in replay_ids),
               served=served, replay_ids=replay_ids, steps=trainer.state.global_step)
    return res


if __name__ == "__main__":
    sys.exit(w.main(sys.argv[1:], run))
