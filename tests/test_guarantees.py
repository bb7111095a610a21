"""The guarantee, everywhere it is claimed (issue 11): one test (or a few) per broken promise.

Resume cases (item 1) are in tests/test_resume.py, damaged mask files (items 8 and 10) in tests/test_mask_integrity.py.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from ssah_plugin import Mask, SSAHCallback, SSAHOptimizer
from ssah_plugin.errors import (
    FrozenValuesError,
    MaskMismatchError,
    UnsupportedSetupError,
)
from ssah_plugin.io.tiny import tiny_model
from ssah_plugin.testing.data import lm_dataset as _dataset
from ssah_plugin.testing.data import random_batches as _batches
from ssah_plugin.testing.oracles import frozen_values as _frozen_values

UNITS = {"model.layers.0.mlp": [0, 3, 127], "model.layers.0.self_attn": [1, 17, 33],
         "model.layers.1.mlp": [5, 64], "model.layers.1.self_attn": [0, 63]}
ROOT = Path(__file__).resolve().parents[1]


def _args(out, steps=4, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2,
                weight_decay=0.1, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _assert_exact(mask, base, model, where=""):
    want, got = _frozen_values(mask, base), _frozen_values(mask, model)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k].to(want[k].dtype)), f"{where}: frozen values of {k} drifted"


# ---------------------------------------------------------------------------------------------- 2. replaced unit
def test_replaced_frozen_unit_is_refused(tmp_path):
    """A base whose one frozen unit holds unrelated values passes the fingerprint; the digests catch it."""
    base = tiny_model("llama", seed=0)
    mask = Mask.from_units(base, UNITS)
    model = tiny_model("llama", seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 64] = torch.randn(64, generator=torch.Generator().manual_seed(9))
    mask.validate(model)  # the 32-sample fingerprint does not see it
    with pytest.raises(FrozenValuesError, match=r"not the mask's base values.*down_proj.weight, 1 of 2 frozen units"
                                                r".*Fix: start from the base model"):
        SSAHOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, mask)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[SSAHCallback(mask)])
    with pytest.raises(FrozenValuesError, match="not the mask's base values"):
        trainer.train()
    # an unfrozen unit replaced the same way is fine: only frozen values must be the base's
    ok = tiny_model("llama", seed=0)
    with torch.no_grad():
        ok.model.layers[1].mlp.down_proj.weight[:, 65] = 0.5
    SSAHOptimizer(torch.optim.AdamW(ok.parameters(), lr=1e-3), ok, mask).remove_hooks()


def test_digest_dtype_rule_bf16_and_fp32_bases():
    """A mask made on fp32 weights checks a bf16 copy, and one made on bf16 checks the fp32 upcast: exact casts."""
    fp32 = tiny_model("llama", seed=0)
    mask = Mask.from_units(fp32, UNITS)
    for model in (tiny_model("llama", seed=0, dtype=torch.bfloat16), tiny_model("llama", seed=0).half()):
        SSAHOptimizer(torch.optim.SGD(model.parameters(), lr=1e-3), model, mask).remove_hooks()
    bf = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    mask_bf = Mask.from_units(bf, UNITS)
    up = copy.deepcopy(bf).float()
    SSAHOptimizer(torch.optim.SGD(up.parameters(), lr=1e-3), up, mask_bf).remove_hooks()
    with pytest.raises(FrozenValuesError):  # fp32 base values are not those of the bf16-made mask
        SSAHOptimizer(torch.optim.SGD(fp32.parameters(), lr=1e-3), fp32, mask_bf)


# ---------------------------------------------------------------------------------------------- 3. schedule-free
@pytest.mark.parametrize("optim", ["schedule_free_adamw", "schedule_free_radam", "schedule_free_sgd"])
def test_schedule_free_trainer_checkpoints_eval_and_save_model_exact(tmp_path, optim):
    pytest.importorskip("schedulefree")
    from safetensors.torch import load_file

    base = tiny_model("llama", seed=0)
    mask = Mask.from_units(base, UNITS)
    model = copy.deepcopy(base)
    ds = _dataset()
    args = _args(tmp_path / "out", steps=6, optim=optim, weight_decay=0.1, save_strategy="steps", save_steps=3,
                 eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds.select(range(4)),
                      callbacks=[SSAHCallback(mask)])
    trainer.train()
    _assert_exact(mask, base, model, "live model after train()")
    for step in (3, 6):
        saved = load_file(str(tmp_path / "out" / f"checkpoint-{step}" / "model.safetensors"))
        ckpt = copy.deepcopy(base)
        ckpt.load_state_dict(saved, strict=False)
        _assert_exact(mask, base, ckpt, f"checkpoint-{step}")
    # it trained (RAdam's rectification may keep the first steps at zero update: look at the last checkpoint)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in saved.items())
    trainer.evaluate()
    trainer.save_model(str(tmp_path / "final"))
    final = copy.deepcopy(base)
    final.load_state_dict(load_file(str(tmp_path / "final" / "model.safetensors")), strict=False)
    _assert_exact(mask, base, final, "save_model() after evaluate()")


def test_schedule_free_custom_loop_train_eval_forwarded():
    sf = pytest.importorskip("schedulefree")
    base = tiny_model("llama", seed=0)
    mask = Mask.from_units(base, UNITS)
    model = copy.deepcopy(base)
    opt = SSAHOptimizer(sf.AdamWScheduleFree(model.parameters(), lr=1e-2, weight_decay=0.1, warmup_steps=1),
                        model, mask)
    assert hasattr(opt, "train") and hasattr(opt, "eval")
    opt.train()
    for ids in _batches(4):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        opt.eval()  # evaluation mode rewrites the parameters from the optimizer's z
        _assert_exact(mask, base, model, "eval mode")
        opt.train()
    _assert_exact(mask, base, model, "train mode")
    assert opt.max_drift() == 0.0
    other = copy.deepcopy(base)
    plain = SSAHOptimizer(torch.optim.AdamW(other.parameters()), other, mask)
    assert not hasattr(plain, "train")  # only forwarded where the wrapped optimizer has it (Trainer checks hasattr)


# ---------------------------------------------------------------------------------------------- 4. PiSSA
@pytest.mark.parametrize("path", ["inject_adapter_in_model", "add_adapter", "add_adapter-state"])
@pytest.mark.parametrize("init", ["pissa", "dora"])
def test_base_rewriting_peft_refused_on_every_path(tmp_path, path, init):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", seed=0)
    mask = Mask.from_units(base, UNITS)
    model = copy.deepcopy(base)
    kw = dict(r=4, target_modules=["down_proj", "o_proj", "up_proj", "v_proj"], lora_alpha=8)
    cfg = peft.LoraConfig(**kw, use_dora=True) if init == "dora" else peft.LoraConfig(**kw, init_lora_weights="pissa")
    if path == "inject_adapter_in_model":
        model = peft.inject_adapter_in_model(cfg, model)
    elif path == "add_adapter-state":  # what transformers' add_adapter leaves (runs where its PEFT is too old)
        model = peft.inject_adapter_in_model(cfg, model)
        model.peft_config = {"default": cfg}
        model._hf_peft_config_loaded = True
    else:
        try:
            model.add_adapter(cfg)
        except ValueError as exc:  # transformers' PEFT integration may want a newer PEFT than the one installed
            if "version of PEFT" in str(exc):
                pytest.skip(str(exc))
            raise
    trainer = Trainer(model=model, args=_args(tmp_path, steps=2), train_dataset=_dataset())
    trainer.add_callback(SSAHCallback(mask))
    with pytest.raises((UnsupportedSetupError, FrozenValuesError), match=r"(?s)PiSSA|pissa|DoRA|dora|variant"):
        trainer.train()
    if path == "add_adapter-state":  # the stored config names the option
        with pytest.raises(UnsupportedSetupError, match="use_dora=True" if init == "dora" else "'pissa'"):
            SSAHOptimizer(torch.optim.AdamW(model.parameters()), model, mask)


# ---------------------------------------------------------------------------------------------- 5. late unfreezing
@pytest.mark.parametrize("in_optimizer", [True, False], ids=["all-params", "trainable-only-then-added"])
def test_progressive_unfreezing_under_ssah_optimizer(in_optimizer):
    base = tiny_model("llama", seed=0)
    mask = Mask.from_units(base, UNITS)
    model = copy.deepcopy(base)
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)
    params = list(model.parameters()) if in_optimizer else [p for p in model.parameters() if p.requires_grad]
    opt = SSAHOptimizer(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), model, mask)
    batches = _batches(6)
    for i, ids in enumerate(batches):
        if i == 2:  # unfreeze layer 1 (progressive unfreezing)
            late = list(model.model.layers[1].parameters())
            for p in late:
                p.requires_grad_(True)
            if not in_optimizer:
                opt.add_param_group({"params": late})
        model(input_ids=ids, labels=ids).loss.backward()
        if i >= 2:  # hooks were added before this backward: frozen gradients are zero (clipping ignores them)
            g = model.model.layers[1].mlp.down_proj.weight.grad
            assert torch.equal(g[:, [5, 64]], torch.zeros_like(g[:, [5, 64]])) and g.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    _assert_exact(mask, base, model, "after unfreezing")
    assert not torch.equal(model.model.layers[1].mlp.down_proj.weight, base.model.layers[1].mlp.down_proj.weight)
    assert opt.max_drift() == 0.0


# ---------------------------------------------------------------------------------------------- 6. from_units
def test_from_units_boolean_masks_and_non_integer_indices():
    model = tiny_model("llama", seed=0)
    sel = torch.zeros(128, dtype=torch.bool)
    sel[[7, 99]] = True
    for units in (sel, sel.numpy(), sel.tolist()):
        m = Mask.from_units(model, {"model.layers.0.mlp": units})
        assert m.frozen()[0].nonzero().reshape(-1).tolist() == [7, 99]
    m = Mask.from_units(model, {"model.layers.0.mlp": torch.tensor([3, 4]), "model.layers.1.mlp": range(2)})
    assert m.frozen()[0].nonzero().reshape(-1).tolist() == [3, 4]
    for bad, why in (([1.5], "must be integers"), (torch.tensor([1.0, 2.0]), "must be integers"),
                     (torch.ones(5, dtype=torch.bool), "one entry per unit"), ([True, 2], "must be integers")):
        with pytest.raises(MaskMismatchError, match=why):
            Mask.from_units(model, {"model.layers.0.mlp": bad})


# ---------------------------------------------------------------------------------------------- 7. BEMA
def test_bema_ema_copy_is_exact(tmp_path):
    trl = pytest.importorskip("trl")
    BEMACallback = getattr(trl, "BEMACallback", None)
    if BEMACallback is None:
        pytest.skip("this TRL has no BEMACallback")
    from transformers import AutoModelForCausalLM

    base = tiny_model("llama", seed=0)
    mask = Mask.from_units(base, UNITS)
    model = copy.deepcopy(base)
    bema = BEMACallback(update_freq=1, update_after=0, device="cpu")
    trainer = Trainer(model=model, args=_args(tmp_path, steps=4), train_dataset=_dataset(), callbacks=[bema])
    SSAHCallback(mask).add_to(trainer)  # runs first: its on_train_end fixes the copy before BEMA's saves it
    trainer.train()
    ema = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bema"))
    _assert_exact(mask, base, ema, "BEMA copy")
    _assert_exact(mask, base, model, "trained model")
    assert not torch.equal(ema.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    # the same run with the plugin passed to the constructor (after BEMA, which cannot be found from there): the copy
    # drifts, so the check above is a real one
    other = copy.deepcopy(base)
    late = Trainer(model=other, args=_args(tmp_path / "late", steps=4), train_dataset=_dataset(),
                   callbacks=[BEMACallback(update_freq=1, update_after=0, device="cpu"), SSAHCallback(mask)])
    late.train()
    _assert_exact(mask, base, other, "trained model")
    with pytest.raises(AssertionError, match="drifted"):
        _assert_exact(mask, base, AutoModelForCausalLM.from_pretrained(str(tmp_path / "late" / "bema")), "BEMA copy")


# ---------------------------------------------------------------------------------------------- 8. raw errors
def test_parametrized_weight_is_refused_at_setup(tmp_path):
    from torch.nn.utils import parametrize

    class Same(torch.nn.Module):
        def forward(self, w):
            return w

    base = tiny_model("llama", seed=0)
    mask = Mask.from_units(base, UNITS)
    model = copy.deepcopy(base)
    parametrize.register_parametrization(model.model.layers[0].mlp.up_proj, "weight", Same())
    with pytest.raises(UnsupportedSetupError, match=r"up_proj.weight is parametrized.*remove_parametrizations"):
        SSAHOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, mask)
    trainer = Trainer(model=model, args=_args(tmp_path, steps=1), train_dataset=_dataset(),
                      callbacks=[SSAHCallback(mask)])
    with pytest.raises(UnsupportedSetupError, match="parametrized"):
        trainer.train()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_after_building_ssah_optimizer_is_followed(dtype):
    base = tiny_model("llama", seed=0)
    mask = Mask.from_units(base, UNITS)
    model = copy.deepcopy(base)
    opt = SSAHOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1), model, mask)
    model.to(dtype)
    for ids in _batches(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert model.model.layers[0].mlp.up_proj.weight.dtype == dtype
    want = _frozen_values(mask, copy.deepcopy(base).to(dtype))
    got = _frozen_values(mask, model)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert opt.max_drift() == 0.0


# ---------------------------------------------------------------------------------------------- 9. CLI
def _cli(*argv, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "ssah_plugin", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_folder_without_model_is_one_line(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    mask = Mask.from_units(tiny_model("llama", seed=0), UNITS).save(tmp_path / "m.safetensors")
    for argv in (["locate", "--model", str(empty), "-o", str(tmp_path / "x.safetensors")],
                 ["eval", "--model", str(empty), "--limit", "1"],
                 ["ablate", "--model", str(empty), "--mask", str(mask), "--class", "SCU"]):
        code, out, err = _cli(*argv)
        assert code == 2, (argv, err[-2000:])
        assert "Traceback" not in err and "holds no model" in err, err[-2000:]
        assert len(err.strip().splitlines()) == 1, err


def test_cli_locate_output_directory_refused_before_work(tmp_path, monkeypatch, capsys):
    from ssah_plugin import cli

    def boom(*a, **k):  # the expensive part must never start
        raise AssertionError("locate ran before the output was checked")

    monkeypatch.setattr("ssah_plugin.locate.runner.locate_pretrained", boom)
    code = cli.main(["locate", "--model", "tiny:llama", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is a directory" in err and "Traceback" not in err
