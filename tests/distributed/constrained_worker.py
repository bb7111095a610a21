"""One rank of a 2-rank check of TokenwiseConstraint (with SSAHCallback) under DeepSpeed; one marker per scenario.

Launched by ``tests/distributed/test_constrained_zero.py``::

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/constrained_worker.py OUT_DIR scenario ...

Scenarios ``host-stage-dtype``: ``trainer-z2-fp32`` (Trainer, prompt-masked LM rows), ``sft-z2-bf16`` (TRL
SFTTrainer, chat rows, DeepSpeed bf16: the training model is cast to bf16 by the engine, the reference must follow),
``trainer-z1-fp32``, ``sft-ddp-fp32`` (DDP, no DeepSpeed), ``trainer-z3-fp32`` (must be refused at set-up). Every
scenario trains with SSAHCallback freezing units too. The scaffolding (markers, errors, resets, barriers) is
``worker.main``.

Each rank writes ``OUT_DIR/<scenario>.rank<r>.json``: the logged losses, the loss expected at the first step (the
policy equals the reference there, so every log-ratio is 0 and the loss is ``log 2 * mean_t 2/beta_t``), the
reference's drift from its values before training (bitwise), the frozen units' drift in the fp32 master weights and
the model copy, and whether the other weights moved; or the error raised.
"""
from __future__ import annotations

import math
import sys

import torch
import worker as w  # this folder's shared worker (the script's folder is first on sys.path)

PROMPT, LENGTH = 6, 20  # LM rows: 6 prompt tokens (label -100), 14 reply tokens
REPLY = "Blue, like the sky."


def init_loss(n_reply: int) -> float:
    from ssah_plugin.recipes.constrained import PAPER_BETA_REST, PAPER_BETAS

    betas = [PAPER_BETAS[k] if k < len(PAPER_BETAS) else PAPER_BETA_REST for k in range(n_reply)]
    return math.log(2.0) * sum(2 / b for b in betas) / n_reply


def lm_dataset(n: int = 32):
    from datasets import Dataset

    ids = torch.randint(3, 500, (n, LENGTH), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})


def chat_dataset(n: int = 32):
    from datasets import Dataset

    return Dataset.from_list([{"messages": [{"role": "user", "content": f"Name colour number {i} please."},
                                            {"role": "assistant", "content": REPLY}]} for i in range(n)])


def frozen_drift(model, mask, before: dict, zero: bool) -> tuple[float, float, int]:
    """Max drift of the frozen slices in the fp32 master weights and in the model copy (collective: all ranks)."""
    from ssah_plugin import plan_frozen_slices

    d_master = d_model = 0.0
    n = 0
    for s in plan_frozen_slices(mask, model, None):
        if zero:
            from deepspeed.utils import safe_get_full_fp32_param

            master = safe_get_full_fp32_param(s.param)
        else:  # DDP: the parameters are the master weights
            master = s.param.detach()
        for key, val in (("master", master), ("model", s.param.detach())):
            if val is None:
                continue
            cur = val.reshape(s.param.shape).index_select(s.axis, s.index).cpu()
            # the engine starts from the model cast to its dtype (fp32 model, DeepSpeed bf16: bf16 values; the fp32
            # master is made from those): that start must be kept exactly
            start = before[s.name].to(s.param.dtype).to(cur.dtype)
            d = float((cur.double() - start.double()).abs().max())
            if key == "master":
                d_master = max(d_master, d)
            else:
                d_model = max(d_model, d)
            n += 1
    return d_master, d_model, n


def run(sc: w.Scenario) -> dict:
    from transformers import Trainer, TrainingArguments

    from ssah_plugin import Mask, SSAHCallback, TokenwiseConstraint, plan_frozen_slices
    from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer

    host, stage, bf16, tmp = sc.host, sc.stage, sc.bf16, sc.tmp
    model = tiny_model("llama", seed=0)  # fp32; under DeepSpeed bf16 the engine casts it
    mask = Mask.from_units(model, w.FROZEN)
    before = {s.name: s.param.detach().index_select(s.axis, s.index).clone()
              for s in plan_frozen_slices(mask, model, None)}
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    constraint = TokenwiseConstraint(model)
    ref_before = {n: p.detach().clone() for n, p in constraint.reference.named_parameters()}
    cb = SSAHCallback(mask)
    common = dict(output_dir=tmp, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=w.STEPS,
                  learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="constant",
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=w.BACKEND != "nccl", bf16=bf16,
                  seed=0, disable_tqdm=True, dataloader_num_workers=0, ddp_backend=w.BACKEND)
    if stage is not None:
        common["deepspeed"] = w.ds_config(stage)
    if host == "trainer":
        args = TrainingArguments(**common)
        _ = args.device
        trainer = constraint.attach(Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[cb]))
        n_reply = LENGTH - PROMPT
    else:
        from trl import SFTConfig, SFTTrainer

        tok = tiny_tokenizer()
        args = SFTConfig(**common, gradient_checkpointing=False, max_length=64, assistant_only_loss=True)
        _ = args.device
        trainer = constraint.attach(SFTTrainer(model=model, args=args, train_dataset=chat_dataset(),
                                               processing_class=tok, callbacks=[cb]))
        n_reply = len(tok(REPLY, add_special_tokens=False)["input_ids"]) + 1  # the reply and its <|im_end|>
    trainer.train()
    trained = trainer.model
    d_master, d_model, checked = frozen_drift(trained, mask, before, zero=stage is not None)
    ref_drift = max(float((p.cpu().double() - ref_before[n].to(p.dtype).double()).abs().max())
                    for n, p in constraint.reference.named_parameters())
    ref_bitwise = all(torch.equal(p.cpu(), ref_before[n].to(p.dtype))
                      for n, p in constraint.reference.named_parameters())
    moved = max(float((p.detach().cpu().double() - full[n].to(p.dtype).double()).abs().max())
                for n, p in trained.named_parameters())
    logs = trainer.state.log_history
    return {"losses": [r["loss"] for r in logs if "loss" in r], "expected_first_loss": init_loss(n_reply),
            "logratio_first": [r.get("tokenwise/logratio_prefix") for r in logs if "loss" in r][:1],
            "calls": constraint.calls, "global_step": trainer.state.global_step,
            "ref_drift": ref_drift, "ref_bitwise": ref_bitwise,
            "ref_dtype": str(next(constraint.reference.parameters()).dtype),
            "model_dtype": str(next(trained.parameters()).dtype),
            "ref_requires_grad": any(p.requires_grad for p in constraint.reference.parameters()),
            "drift_master": d_master, "drift_model": d_model, "checked": checked,
            "enforcer_drift": cb.enforcer.max_drift(), "enforcer": type(cb.enforcer).__name__, "moved": moved,
            "host_optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__}


if __name__ == "__main__":
    sys.exit(w.main(sys.argv[1:], run))
