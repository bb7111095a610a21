"""SSAHCallback with transformers.Trainer: bitwise freezing per architecture, grad-norm parity, logs, resume.

Every family is trained 5 optimizer steps with AdamW (weight decay 0.1), a linear LR schedule with warm-up, gradient
accumulation 2 and clipping that triggers (max_grad_norm 0.01), in fp32 and in bf16 autocast. The reference run is
independent code: frozen gradients zeroed by hand after each backward (before clipping) and frozen values written
back by hand after each optimizer step, both with dense boolean masks.
"""
from __future__ import annotations

import copy
import functools

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
from ssah_plugin.testing.trainers import grad_norms as _grad_norms

MAX_GRAD_NORM = 0.01
CONSTANT_LR = {"lr_scheduler_type": "constant", "warmup_steps": 0}  # weight decay moves frozen values at every step



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


def _trained(model, out, callbacks, *, ds=None, trainer_cls=Trainer, **kw) -> Trainer:
    """A ``trainer_cls`` on ``ds`` (default: the shared tiny LM dataset), already trained; ``kw`` go to ``_args``."""
    trainer = trainer_cls(model=model, args=_args(out, **kw), train_dataset=_dataset() if ds is None else ds,
                          callbacks=callbacks)
    trainer.train()
    return trainer


def _assert_same_run(a: Trainer, b: Trainer) -> None:
    """Two runs took the same gradient norms and ended at the same weights, bit for bit."""
    assert _grad_norms(a) == _grad_norms(b)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n


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
    trainer = _trained(model, tmp_path / "a", [cb], ds=ds, bf16=bf16)
    ref = _trained(ref_model, tmp_path / "b", [HandRestore(dense, base)], ds=ds, bf16=bf16,
                   trainer_cls=functools.partial(HandMaskedTrainer, dense=dense))

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
    t1 = _trained(model, tmp_path / "a", [SSAHCallback(mask)], ds=ds, steps=2)
    restore_only = SSAHCallback(mask, grad_mode="none")
    t2 = _trained(plain, tmp_path / "b", [restore_only], ds=ds, steps=2)
    assert _grad_norms(t1)[0] < _grad_norms(t2)[0]
    assert restore_only.summary["max_drift"] == 0.0  # restore alone still keeps values exact


def test_tensor_grad_mode_same_result(tmp_path):
    model = tiny_model("qwen2", seed=0)
    mask = Mask.from_units(model, _units(model))
    other = copy.deepcopy(model)
    ds = _dataset()
    auto = SSAHCallback(mask)
    a = _trained(model, tmp_path / "a", [auto], ds=ds, steps=3)
    cb = SSAHCallback(mask, grad_mode="tensor")
    b = _trained(other, tmp_path / "b", [cb], ds=ds, steps=3)
    assert auto.enforcer.grad_mode == "post_accumulate"  # auto, single process
    assert cb.enforcer.grad_mode == "tensor"
    _assert_same_run(a, b)


class Reporter(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


class FrozenWatcher(TrainerCallback):
    """Stands for a callback that reads weights (an EMA, a probe): are the frozen values exact when it runs?"""

    def __init__(self, dense, base):
        self.dense, self.base, self.exact = dense, base, {"on_optimizer_step": [], "on_step_end": []}

    def _look(self, event, model):
        params = dict(model.named_parameters())
        self.exact[event].append(all(torch.equal(params[n].detach()[m], self.base[n][m]) for n, m in self.dense.items()))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._look("on_optimizer_step", model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._look("on_step_end", model)


def _check_summary(trainer, cb):
    hits = [r for r in trainer.state.log_history if "ssah/frozen_fraction" in r]
    assert len(hits) == 1 and hits[0]["ssah/frozen_units"] == 3  # once, in trainer_state.json's log history
    assert hits[0]["ssah/frozen_fraction"] == round(3 / 384, 6)
    assert cb.summary == {"policy": "explicit", "frozen_units": 3, "units": 384, "frozen_fraction": 3 / 384,
                          "frozen_elements": 3 * 64 * 3, "steps": 3, "max_drift": 0.0}


def test_constructor_callback_order_logs_and_weights(tmp_path):
    """Trainer(callbacks=[...]) keeps the user's order: callbacks before ours see neither its log entry nor the
    restored values at on_optimizer_step; from on_step_end on every callback sees the exact values."""
    model = tiny_model("llama", seed=0)
    mask = Mask.from_units(model, {"model.layers.0.mlp": [1, 2, 3]})
    dense, base = _dense_masks(mask, model), _snapshot(model)
    before, after, watch_before, watch_after = Reporter(), Reporter(), FrozenWatcher(dense, base), \
        FrozenWatcher(dense, base)
    cb = SSAHCallback(mask)
    trainer = _trained(model, tmp_path, [before, watch_before, cb, after, watch_after], steps=3, **CONSTANT_LR)
    _check_summary(trainer, cb)
    assert sum("ssah/frozen_fraction" in r for r in after.seen) == 1
    assert not any("ssah/frozen_fraction" in r for r in before.seen)
    assert watch_after.exact["on_optimizer_step"] == [True] * 3
    assert watch_before.exact["on_optimizer_step"] == [False] * 3  # weight decay moved them; restored right after
    assert watch_before.exact["on_step_end"] == watch_after.exact["on_step_end"] == [True] * 3
    # hooks are removed at the end
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()
               if getattr(p, "_post_accumulate_grad_hooks", None) is not None)


def test_add_to_runs_first_and_keeps_the_others(tmp_path):
    """add_to(trainer) puts the callback ahead of every other (transformers' add_callback / pop_callback): the
    reporters registered before it receive its log entry and every callback sees the restored values."""
    from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback

    model = tiny_model("llama", seed=0)
    mask = Mask.from_units(model, {"model.layers.0.mlp": [1, 2, 3]})
    dense, base = _dense_masks(mask, model), _snapshot(model)
    reporter, watcher = Reporter(), FrozenWatcher(dense, base)
    user_list = [reporter, watcher]
    trainer = Trainer(model=model, args=_args(tmp_path, steps=3, **CONSTANT_LR), train_dataset=_dataset(),
                      callbacks=user_list)
    others = list(trainer.callback_handler.callbacks)
    cb = SSAHCallback(mask).add_to(trainer)
    assert user_list == [reporter, watcher]  # the user's list is left alone
    assert trainer.callback_handler.callbacks == [cb, *others]  # first, the others in their order
    assert isinstance(others[0], DefaultFlowCallback) and isinstance(others[-1], PrinterCallback)
    trainer.train()
    assert trainer.state.global_step == 3  # DefaultFlowCallback still drives logging and stopping
    _check_summary(trainer, cb)
    assert sum("ssah/frozen_fraction" in r for r in reporter.seen) == 1  # the reporter saw it
    assert watcher.exact["on_optimizer_step"] == watcher.exact["on_step_end"] == [True] * 3
    assert cb.add_to(trainer) is cb and trainer.callback_handler.callbacks == [cb, *others]  # idempotent
    with pytest.raises(MaskMismatchError, match="made for other weights"):  # validated at add_to, like on_init_end
        SSAHCallback(mask).add_to(Trainer(model=tiny_model("llama", seed=1), args=_args(tmp_path / "x"),
                                          train_dataset=_dataset()))


def test_snapshot_in_host_memory_is_bitwise_the_same_run(tmp_path):
    model = tiny_model("qwen2", seed=0)
    mask = Mask.from_units(model, _units(model))
    other, base, dense = copy.deepcopy(model), _snapshot(model), _dense_masks(mask, model)
    ds = _dataset()
    a = _trained(model, tmp_path / "a", [SSAHCallback(mask)], ds=ds, steps=3)
    cb = SSAHCallback(mask, snapshot_device="cpu")
    b = _trained(other, tmp_path / "b", [cb], ds=ds, steps=3)
    assert cb.enforcer.snapshot_device == "cpu" and all(t.device.type == "cpu" for t in cb.enforcer._snapshots)
    assert cb.summary["max_drift"] == 0.0
    params = dict(other.named_parameters())
    for name, m in dense.items():
        assert torch.equal(params[name].detach()[m], base[name][m]), name
    _assert_same_run(a, b)


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
    _trained(model, tmp_path, [cb], steps=3, learning_rate=5e-2)
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
    with pytest.raises(TypeError, match="mask must be a "):
        SSAHCallback(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"snapshot_device must be 'param' .* or 'cpu' .* got 'pinned'"):
        SSAHCallback(mask, snapshot_device="pinned")  # type: ignore[arg-type]
    with pytest.raises(MaskMismatchError, match="made for other weights"):
        Trainer(model=tiny_model("llama", seed=1), args=_args(tmp_path), train_dataset=_dataset(),
                callbacks=[SSAHCallback(mask)])
    with pytest.raises(MaskMismatchError, match="architecture 'llama', model is 'gpt2'"):
        Trainer(model=tiny_model("gpt2"), args=_args(tmp_path), train_dataset=_dataset(),
                callbacks=[SSAHCallback(mask)])
    path = mask.save(tmp_path / "m.safetensors")
    cb = SSAHCallback(str(path), policy="none")
    assert cb.mask.frozen_fraction("none") == 0.0
