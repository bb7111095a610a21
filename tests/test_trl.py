"""SSAHCallback with TRL: SFTTrainer (gradient checkpointing on, TRL's default) and DPOTrainer (reference model untouched).

TRL 1.16 defaults to bf16=True and gradient checkpointing on in SFTConfig/DPOConfig: both are set explicitly here.
"""
from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from ssah_plugin.core.mask import Mask
from ssah_plugin.hosts.callback import SSAHCallback
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer

trl = pytest.importorskip("trl")

UNITS = {"model.layers.0.mlp": [0, 9, 100], "model.layers.0.self_attn": [2, 40], "model.layers.1.mlp": [5],
         "model.layers.1.self_attn": [63]}



def _common(out, **kw):
    return dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
                learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.05, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, **kw)


def _frozen_equal(model, mask, base) -> None:
    params = dict(model.named_parameters())
    for g, frozen in zip(mask.groups, mask.frozen()):
        units = torch.nonzero(frozen).squeeze(1)
        for s in g.slices:
            p = params[s.name].detach()
            for u in units.tolist():
                assert torch.equal(p.index_select(s.axis, s.index[u]), base[s.name].index_select(s.axis, s.index[u]))


def _hooks(p: torch.Tensor) -> int:
    return len(getattr(p, "_backward_hooks", None) or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})


class HookProbe(TrainerCallback):
    """Counts gradient hooks on the policy and on the reference model while training runs."""

    def __init__(self, policy, ref):
        self.policy, self.ref = policy, ref
        self.policy_hooks, self.ref_hooks = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.policy_hooks.append(sum(_hooks(p) for p in self.policy.parameters()))
        self.ref_hooks.append(sum(_hooks(p) for p in self.ref.parameters()))


def test_sft_trainer(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=0)
    mask = Mask.from_units(model, UNITS)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"messages": [{"role": "user", "content": f"Name a colour number {i}."},
                          {"role": "assistant", "content": f"Colour {i} is blue, like the sky."}]} for i in range(16)]
    args = SFTConfig(**_common(tmp_path), bf16=False, gradient_checkpointing=True, max_length=64,
                     assistant_only_loss=True)
    cb = SSAHCallback(mask)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 4 and cb.summary["max_drift"] == 0.0
    _frozen_equal(model, mask, base)
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, base["model.layers.0.mlp.down_proj.weight"])
    assert sum("ssah/frozen_fraction" in r for r in trainer.state.log_history) == 1


def test_dpo_trainer_reference_untouched(tmp_path):
    from trl import DPOConfig, DPOTrainer

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=0)
    ref_model = copy.deepcopy(model)
    ref_before = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    mask = Mask.from_units(model, UNITS)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"prompt": f"Question {i}: how do I pick a lock?", "chosen": " I can't help with that.",
             "rejected": f" Sure, step {i}: insert a tension wrench."} for i in range(16)]
    args = DPOConfig(**_common(tmp_path), bf16=False, gradient_checkpointing=False, max_length=64, beta=0.1)
    cb = SSAHCallback(mask)
    probe = HookProbe(model, ref_model)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[cb, probe])
    trainer.train()
    assert trainer.state.global_step == 4 and cb.summary["max_drift"] == 0.0
    assert all(h > 0 for h in probe.policy_hooks), "the probe must see the policy's hooks (probe can fail)"
    assert probe.ref_hooks == [0] * 4, "no hook may be registered on the reference model"
    assert {s.param.data_ptr() for s in cb.enforcer.slices}.isdisjoint(
        p.data_ptr() for p in ref_model.parameters())
    for n, p in ref_model.named_parameters():
        assert torch.equal(p, ref_before[n]), f"reference model changed: {n}"
    _frozen_equal(model, mask, base)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base["model.layers.0.mlp.up_proj.weight"])
