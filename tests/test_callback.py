"""SSAHCallback with transformers.Trainer: bitwise freezing per architecture, grad-norm parity, logs, resume.

Every family is trained 5 optimizer steps with AdamW (weight decay 0.1), a linear LR schedule with warm-up, gradient
accumulation 2 and clipping that triggers (max_grad_norm 0.01), in fp32 and in bf16 autocast. The reference run is
independent code: frozen gradients zeroed by hand after each backward (before clipping) and frozen values written
back by hand after each optimizer step, both with dense boolean masks.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ssah_plugin.core.mask import Mask
from ssah_plugin.errors import MaskMismatchError, SSAHError
from ssah_plugin.hosts.callback import SSAHCallback
from ssah_plugin.io.tiny import TINY_FAMILIES, tiny_model
from ssah_plugin.testing.data import lm_dataset as _dataset
from ssah_plugin.testing.oracles import dense_frozen_masks as _dense_masks
from ssah_plugin.testing.trainers import HandMaskedTrainer, HandRestore

MAX_GRAD_NORM = 0.01



def _units(model) -> dict[str, list[int]]:
    from ssah_plugin.core.units import describe_units

    out = {}
    for gi, g in enumerate(describe_units(model)):
        out[g.name] = [(7 * k + gi) % g.n_units for k in range(6)]  # a few units in every group
    return out


def _args(out, *, bf16=False, steps=5, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=steps,
                learning_rate=1e-2, weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="linear",
                warmup_steps=1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=bf16, seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _grad_norms(trainer) -> list[float]:
    return [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_trainer_bitwise_per_architecture(family, bf16, tmp_path):
    model = tiny_model(family, seed=0)
    mask = Mask.from_units(model, _units(model))
    base = _snapshot(model)
    dense = _dense_masks(mask, model)
    ref_model = copy.deepcopy(model)
    ds = _dataset()

    cb = SSAHCallback(mask)
    trainer = Trainer(model=model, args=_args(tmp_path / "a", bf16=bf16), train_dataset=ds, callbacks=[cb])
    trainer.train()
    ref = HandMaskedTrainer(model=ref_model, args=_args(tmp_path / "b", bf16=bf16), train_dataset=ds,
                            callbacks=[HandRestore(dense, base)])
    ref.dense = dense
    ref.train()

    assert trainer.state.global_step == 5 and cb.summary["steps"] == 5 and cb.summary["max_drift"] == 0.0
    params = dict(model.named_parameters())
    for name, m in dense.items():
        p = params[name].detach()
        assert torch.equal(p[m], base[name][m]), f"{family}: frozen slice of {name} changed"
        assert m.any() and not m.all()
        assert not torch.equal(p[~m], base[name][~m]), f"{family}: unfrozen part of {name} did not train"
    norms, ref_norms = _grad_norms(trainer), _grad_norms(ref)
    assert len(norms) == 5 and norms == ref_norms  # exact float equality
    assert all(n > MAX_GRAD_NORM for n in norms)  # clipping really happened
    for name, p in ref_model.named_parameters():  # the whole trained model equals the reference, bitwise
        assert torch.equal(p, params[name]), name


def test_grad_norm_reference_can_fail(tmp_path):
    """Without gradient masking the grad norm differs: the parity above is a real check."""
    model = tiny_model("llama", seed=0)
    mask = Mask.from_units(model, _units(model))
    plain = copy.deepcopy(model)
    ds = _dataset()
    t1 = Trainer(model=model, args=_args(tmp_path / "a", steps=2), train_dataset=ds, callbacks=[SSAHCallback(mask)])
    t1.train()
    t2 = Trainer(model=plain, args=_args(tmp_path / "b", steps=2), train_dataset=ds,
                 callbacks=[SSAHCallback(mask, grad_mode="none")])
    t2.train()
    assert _grad_norms(t1)[0] < _grad_norms(t2)[0]
    assert t2.callback_handler.callbacks[0].summary["max_drift"] == 0.0  # restore alone still keeps values exact


def test_tensor_grad_mode_same_result(tmp_path):
    model = tiny_model("qwen2", seed=0)
    mask = Mask.from_units(model, _units(model))
    other = copy.deepcopy(model)
    ds = _dataset()
    a = Trainer(model=model, args=_args(tmp_path / "a", steps=3), train_dataset=ds, callbacks=[SSAHCallback(mask)])
    a.train()
    cb = SSAHCallback(mask, grad_mode="tensor")
    b = Trainer(model=other, args=_args(tmp_path / "b", steps=3), train_dataset=ds, callbacks=[cb])
    b.train()
    assert a.callback_handler.callbacks[0].enforcer.grad_mode == "post_accumulate"  # auto, single process
    assert cb.enforcer.grad_mode == "tensor"
    assert _grad_norms(a) == _grad_norms(b)
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), n


class Reporter(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


def test_logs_once_and_summary_and_order(tmp_path):
    model = tiny_model("llama", seed=0)
    mask = Mask.from_units(model, {"model.layers.0.mlp": [1, 2, 3]})
    reporter = Reporter()  # stands for TensorBoard/W&B: registered before our callback
    cb = SSAHCallback(mask)
    user_list = [reporter, cb]
    trainer = Trainer(model=model, args=_args(tmp_path, steps=3), train_dataset=_dataset(), callbacks=user_list)
    trainer.train()
    assert user_list == [reporter, cb] and trainer.callback_handler.callbacks[0] is cb  # only the handler's list
    hits = [r for r in trainer.state.log_history if "ssah/frozen_fraction" in r]
    assert len(hits) == 1 and hits[0]["ssah/frozen_units"] == 3
    assert hits[0]["ssah/frozen_fraction"] == round(3 / 384, 6)
    assert sum("ssah/frozen_fraction" in r for r in reporter.seen) == 1  # the reporter saw it
    assert cb.summary == {"policy": "explicit", "frozen_units": 3, "units": 384, "frozen_fraction": 3 / 384,
                          "frozen_elements": 3 * 64 * 3, "steps": 3, "max_drift": 0.0}
    # hooks are removed at the end
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()
               if getattr(p, "_post_accumulate_grad_hooks", None) is not None)


def test_resume_keeps_original_base_values(tmp_path):
    base_model = tiny_model("llama", seed=0)
    mask = Mask.from_units(base_model, _units(base_model))
    base = _snapshot(base_model)
    dense = _dense_masks(mask, base_model)
    ds = _dataset()
    kw = dict(learning_rate=1e-3, save_strategy="steps", save_steps=3, lr_scheduler_type="constant")
    first = Trainer(model=base_model, args=_args(tmp_path, steps=6, **kw), train_dataset=ds,
                    callbacks=[SSAHCallback(mask)])
    first.train_dataset = ds.select(range(12))  # 3 steps x (2 x 2) rows: stop after the checkpoint
    first.args.max_steps = 3
    first.train()
    ckpt = tmp_path / "checkpoint-3"
    assert ckpt.is_dir()
    fresh = tiny_model("llama", seed=0)  # as a user would: load the base model again, then resume
    cb = SSAHCallback(mask)
    second = Trainer(model=fresh, args=_args(tmp_path, steps=6, **kw), train_dataset=ds, callbacks=[cb])
    second.train(resume_from_checkpoint=str(ckpt))
    assert second.state.global_step == 6 and cb.summary["steps"] == 3
    after3 = dict(base_model.named_parameters())
    for name, p in fresh.named_parameters():
        if name in dense:
            m = dense[name]
            assert torch.equal(p.detach()[m], base[name][m]), name
            assert not torch.equal(p.detach()[~m], after3[name].detach()[~m]), f"{name}: steps 4-6 did not train"


def test_tied_embeddings_and_bf16_model_without_master_weights(tmp_path):
    model = tiny_model("llama", seed=0, dtype=torch.bfloat16, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    mask = Mask.from_units(model, _units(model))
    cb = SSAHCallback(mask)
    base = _snapshot(model)
    trainer = Trainer(model=model, args=_args(tmp_path, steps=3, learning_rate=5e-2), train_dataset=_dataset(),
                      callbacks=[cb])
    trainer.train()
    planned = {s.name for s in cb.enforcer.slices}
    assert not any("embed" in n or "lm_head" in n for n in planned)
    assert not torch.equal(model.model.embed_tokens.weight, base["model.embed_tokens.weight"])  # trains normally
    dense = _dense_masks(mask, model)
    for name, p in model.named_parameters():
        if name in dense:
            assert p.dtype == torch.bfloat16
            assert torch.equal(p.detach()[dense[name]], base[name][dense[name]]), name
            assert not torch.equal(p.detach()[~dense[name]], base[name][~dense[name]]), name


def test_setup_errors_before_training(tmp_path):
    model = tiny_model("llama", seed=0)
    mask = Mask.from_units(model, {"model.layers.0.mlp": [0]})
    with pytest.raises(SSAHError, match="unknown policy 'nope'"):
        SSAHCallback(mask, policy="nope")
    with pytest.raises(TypeError, match="mask must be a path"):
        SSAHCallback(42)  # type: ignore[arg-type]
    with pytest.raises(MaskMismatchError, match="made for other weights"):
        Trainer(model=tiny_model("llama", seed=1), args=_args(tmp_path), train_dataset=_dataset(),
                callbacks=[SSAHCallback(mask)])
    with pytest.raises(MaskMismatchError, match="architecture 'llama', model is 'gpt2'"):
        Trainer(model=tiny_model("gpt2"), args=_args(tmp_path), train_dataset=_dataset(),
                callbacks=[SSAHCallback(mask)])
    path = mask.save(tmp_path / "m.safetensors")
    cb = SSAHCallback(str(path), policy="none")
    assert cb.mask.frozen_fraction("none") == 0.0
