"""Resume under the Trainer (issue 11, item 1): the frozen values held after a resume are the mask's base values.

Every case saves a checkpoint at step 3 with one set-up and resumes it with another, as a user would (a fresh base
model loaded again, then ``train(resume_from_checkpoint=...)``). Refused: a checkpoint trained without the plugin,
a wider policy than the checkpoint's, a mask made for other weights applied through ``add_callback``, and (for a
mask without digests) a checkpoint that cannot be shown to hold the base values. Accepted: the same mask and policy,
also through ``add_callback`` and with ``restore_callback_states_from_checkpoint``.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

from ssah_plugin import Mask, SSAHCallback
from ssah_plugin.errors import FrozenValuesError, ResumeMismatchError
from ssah_plugin.io.tiny import tiny_model
from ssah_plugin.testing.data import lm_dataset as _dataset

NARROW = {"model.layers.0.mlp": [0, 3], "model.layers.1.self_attn": [5]}
WIDE_EXTRA = {"model.layers.1.mlp": [7, 8], "model.layers.0.self_attn": [2]}


def _args(out, steps, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2,
                weight_decay=0.1, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=3,
                report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _two_policy_mask(model) -> Mask:
    """Stored policies "narrow" and "wide" (a superset): the wider-policy resume case."""
    mask = Mask.from_units(model, NARROW, policy="narrow")
    wide = Mask.from_units(model, {**NARROW, **{k: v for k, v in WIDE_EXTRA.items()}}, policy="wide")
    mask.stored["wide"] = wide.stored["wide"]
    return mask


def _frozen_equal(mask, policy, a, b) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for g, frozen in zip(mask.groups, mask.frozen(policy)):
        idx = frozen.nonzero().reshape(-1)
        for s in g.slices:
            if idx.numel():
                i = s.index[idx].reshape(-1)
                if not torch.equal(pa[s.name].detach().index_select(s.axis, i),
                                   pb[s.name].detach().index_select(s.axis, i)):
                    return False
    return True


def _first_run(tmp_path, callbacks) -> str:
    model = tiny_model("llama", seed=0)
    trainer = Trainer(model=model, args=_args(tmp_path, 3), train_dataset=_dataset(), callbacks=callbacks)
    trainer.train()
    ckpt = tmp_path / "checkpoint-3"
    assert ckpt.is_dir()
    return str(ckpt)


def _resume(tmp_path, ckpt, *, callbacks=(), add=None, **kw):
    model = tiny_model("llama", seed=0)
    trainer = Trainer(model=model, args=_args(tmp_path, 6, **kw), train_dataset=_dataset(), callbacks=list(callbacks))
    if add is not None:
        trainer.add_callback(add)
    trainer.train(resume_from_checkpoint=ckpt)
    return trainer, model


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", seed=0)


def test_checkpoint_records_the_plugin_state(tmp_path, base):
    mask = _two_policy_mask(base)
    ckpt = _first_run(tmp_path, [SSAHCallback(mask, policy="narrow")])
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    rec = state["stateful_callbacks"]["SSAHCallback"]["attributes"]["record"]
    assert rec["policy"] == "narrow" and rec["frozen_units"] == 3 and rec["base_checked"] is True
    assert rec["frozen_set"] == mask.frozen_set_digest("narrow") and rec["mask_checksum"] == mask.checksum
    assert len(rec["values_digest"]) == 64
    trainer, model = _resume(tmp_path, ckpt, callbacks=[SSAHCallback(mask, policy="narrow")])
    assert trainer.state.global_step == 6 and _frozen_equal(mask, "narrow", model, base)


def test_resume_from_checkpoint_trained_without_plugin_is_refused(tmp_path, base):
    mask = _two_policy_mask(base)
    ckpt = _first_run(tmp_path, [])
    with pytest.raises(FrozenValuesError, match=r"not the mask's base values.*fine-tuned without this mask"):
        _resume(tmp_path, ckpt, callbacks=[SSAHCallback(mask, policy="narrow")])


def test_resume_with_wider_policy_is_refused(tmp_path, base):
    mask = _two_policy_mask(base)
    ckpt = _first_run(tmp_path, [SSAHCallback(mask, policy="narrow")])
    with pytest.raises(ResumeMismatchError, match=r"another frozen set.*policy 'narrow'.*policy 'wide'.*Fix: resume "
                                                  r"with the mask and policy"):
        _resume(tmp_path, ckpt, callbacks=[SSAHCallback(mask, policy="wide")])


def test_add_callback_then_resume_checks_values(tmp_path, base):
    """add_callback skips on_init_end (the old only fingerprint check); the values are checked at train() start."""
    mask = _two_policy_mask(base)
    ckpt = _first_run(tmp_path, [SSAHCallback(mask, policy="narrow")])
    other = Mask.from_units(tiny_model("llama", seed=1), NARROW, policy="narrow")  # same units, other weights
    with pytest.raises(FrozenValuesError, match="not the mask's base values"):
        _resume(tmp_path, ckpt, add=SSAHCallback(other))
    no_plugin = _first_run(tmp_path / "np", [])
    with pytest.raises(FrozenValuesError):
        _resume(tmp_path / "np", no_plugin, add=SSAHCallback(mask, policy="narrow"))
    trainer, model = _resume(tmp_path, ckpt, add=SSAHCallback(mask, policy="narrow"))  # the right one: accepted
    assert trainer.state.global_step == 6 and _frozen_equal(mask, "narrow", model, base)


def test_mask_without_digests(tmp_path, base):
    """A format-1 mask (no digests) resumes its own checkpoints (frozen-value digest saved in the checkpoint) and
    refuses a checkpoint it cannot vouch for."""
    mask = _two_policy_mask(base)
    mask.digests = {}
    ckpt = _first_run(tmp_path, [SSAHCallback(mask, policy="narrow")])
    trainer, model = _resume(tmp_path, ckpt, callbacks=[SSAHCallback(mask, policy="narrow")])
    assert _frozen_equal(mask, "narrow", model, base)
    no_plugin = _first_run(tmp_path / "np", [])
    with pytest.raises(ResumeMismatchError, match=r"written without SSAHCallback.*cannot prove.*record_base"):
        _resume(tmp_path / "np", no_plugin, callbacks=[SSAHCallback(mask, policy="narrow")])


def test_restore_callback_states_option(tmp_path, base):
    """With restore_callback_states_from_checkpoint the Trainer rebuilds the callback from its saved arguments."""
    path = _two_policy_mask(base).save(tmp_path / "mask.safetensors")
    ckpt = _first_run(tmp_path, [SSAHCallback(str(path), policy="narrow")])
    trainer, model = _resume(tmp_path, ckpt, callbacks=[SSAHCallback(str(path), policy="narrow")],
                             restore_callback_states_from_checkpoint=True)
    cb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SSAHCallback))
    assert cb.summary["steps"] == 3 and cb.summary["max_drift"] == 0.0
    assert _frozen_equal(Mask.load(path), "narrow", model, base)
