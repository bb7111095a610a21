"""TRL trainers with ``peft_config``: the trainer wraps the model with LoRA inside its constructor; the unchanged
``SSAHCallback`` line resolves the mask at ``on_train_begin`` (after the wrapping) and keeps frozen units exact
through ``merge_and_unload``. Also: ``ssah-plugin verify`` on the saved adapter directory plus its base.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("trl")
from peft import LoraConfig  # noqa: E402

from ssah_plugin import SSAHCallback  # noqa: E402
from ssah_plugin.core.mask import Mask  # noqa: E402
from ssah_plugin.core.units import describe_units  # noqa: E402
from ssah_plugin.errors import UnsupportedSetupError  # noqa: E402
from ssah_plugin.hosts.peft import compare_frozen_units  # noqa: E402
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer  # noqa: E402

FROZEN = [0, 3, 7]
TARGETS = {
    "llama": "all-linear",
    "gpt2": ["c_fc", "c_proj", "c_attn"],
    "phi3": ["gate_up_proj", "down_proj", "qkv_proj", "o_proj"],
}
COMMON = dict(max_steps=3, learning_rate=1e-2, weight_decay=0.1, per_device_train_batch_size=4, bf16=False,
              gradient_checkpointing=False, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
              max_length=64, dataloader_num_workers=0, seed=0)


def _lora(family: str, **kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2",
                      task_type="CAUSAL_LM", **kw)


def _setup(family: str):
    model = tiny_model(family)
    base = copy.deepcopy(model)
    mask = Mask.from_units(model, {g.name: FROZEN for g in describe_units(model)})
    return model, base, mask


def _sft_data():
    from datasets import Dataset

    return Dataset.from_list([
        {"messages": [{"role": "user", "content": f"question {i}"},
                      {"role": "assistant", "content": f"the answer number {i} is fine"}]} for i in range(8)])


def _sft(model, mask, peft_config, out_dir, **overrides):
    from trl import SFTConfig, SFTTrainer

    cb = SSAHCallback(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = SFTConfig(output_dir=str(out_dir), **{**COMMON, **overrides})
        trainer = SFTTrainer(model=model, args=args, train_dataset=_sft_data(),
                             processing_class=tiny_tokenizer(), peft_config=peft_config, callbacks=[cb])
    return trainer, cb


def _check(trainer, cb, base, mask):
    assert type(trainer.model).__name__.startswith("PeftModel")  # wrapped by TRL, after the callback was made
    assert cb.summary["steps"] == 3 and cb.summary["max_drift"] == 0.0
    merged = trainer.model.merge_and_unload()
    rep = compare_frozen_units(mask, base, merged)
    assert rep["checked"] > 0 and rep["mismatched"] == [], rep
    assert rep["changed_unfrozen"] > 0
    return merged


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_sft_trainer_with_peft_config(family, tmp_path):
    model, base, mask = _setup(family)
    # llama: TRL's default gradient checkpointing (on), as most users run it
    trainer, cb = _sft(model, mask, _lora(family), tmp_path, gradient_checkpointing=family == "llama")
    trainer.train()
    _check(trainer, cb, base, mask)


def test_dpo_trainer_with_peft_config_no_ref_model(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, base, mask = _setup("llama")
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"question {i}"}],
         "chosen": [{"role": "assistant", "content": f"a good answer {i}"}],
         "rejected": [{"role": "assistant", "content": f"bad {i}"}]} for i in range(8)])
    cb = SSAHCallback(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path), **COMMON), train_dataset=data,
                             processing_class=tiny_tokenizer(), peft_config=_lora("llama"), callbacks=[cb])
    trainer.train()
    _check(trainer, cb, base, mask)


def test_sft_refuses_dora_before_any_step(tmp_path):
    model, _, mask = _setup("llama")
    with pytest.raises(UnsupportedSetupError, match="use_dora"):
        trainer, _ = _sft(model, mask, _lora("llama", use_dora=True), tmp_path)
        trainer.train()


def test_verify_accepts_adapter_dir_plus_base(tmp_path):
    """``ssah-plugin verify --base BASE --tuned ADAPTER_DIR``: exit 0 for a masked run, 1 for an unmasked one."""
    verify = pytest.importorskip("ssah_plugin.evaluation.verify")
    from ssah_plugin.cli import main

    model, base, mask = _setup("llama")
    base.save_pretrained(tmp_path / "base")
    mask.save(tmp_path / "mask.safetensors")
    trainer, _ = _sft(model, mask, _lora("llama"), tmp_path / "run")
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "adapter")
    report = verify.verify_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "mask.safetensors",
                                      progress=False)
    assert report.ok and report.total.frozen_units > 0 and report.total.trainable_changed_units > 0
    argv = ["verify", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "adapter"),
            "--mask", str(tmp_path / "mask.safetensors"), "--no-progress"]
    assert main(argv) == 0
    # the same adapter with a frozen row of lora_B moved: merged weights now differ on a frozen unit
    with torch.no_grad():
        trainer.model.base_model.model.model.layers[0].mlp.up_proj.lora_B["default"].weight[FROZEN[1]] += 0.5
    trainer.model.save_pretrained(tmp_path / "bad_adapter")
    argv[4] = str(tmp_path / "bad_adapter")
    assert main(argv) == 1
