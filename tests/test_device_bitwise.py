"""The core bitwise guarantees on every test device (``torch_device``: cpu here, cuda on a GPU machine), fp32 and bf16.

* ``transformers.Trainer`` + ``SSAHCallback``: AdamW with weight decay, linear warm-up, gradient accumulation 2 and
  clipping that triggers; ``bf16`` is the Trainer's bf16 autocast (fp32 master weights). The reference is the hand
  masking / hand restore Trainer of :mod:`ssah_plugin.testing.trainers`.
* a custom loop with ``SSAHOptimizer`` (AdamW, LambdaLR, clipping); ``bf16`` is a model held in bf16 (no master
  copy). The reference is the same loop with hand masking and restore.
* LoRA (PEFT) with ``SSAHOptimizer``; ``bf16`` is a bf16 base model. Checked after ``merge_and_unload``.

Every test runs with the snapshot next to the parameters (``snapshot_device="param"``, the default) and in host
memory (``"cpu"``: pinned, restored with non-blocking copies when the parameters are on a GPU; on a CPU run both
modes hold the snapshot in the same memory, so the GPU run is the one that tells them apart).

Each test checks the guarantee itself (every frozen element bitwise equal to the base, every touched tensor's
unfrozen part moved) and, where a reference exists, that the whole trained model and the grad norms equal the
reference bitwise. The comparisons run under ``torch.use_deterministic_algorithms`` (``deterministic`` fixture) and
eager attention, so two runs of the same computation on a GPU agree bit for bit. Run on a GPU with
``SSAH_TEST_DEVICE=cuda pytest tests/test_device_bitwise.py`` (``benchmarks/gpu/run.sh`` does).
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

from ssah_plugin import Mask, SSAHCallback, SSAHOptimizer
from ssah_plugin.io.tiny import tiny_model
from ssah_plugin.testing.data import lm_rows, random_batches
from ssah_plugin.testing.oracles import (
    clone_params,
    dense_frozen_masks,
    hand_mask_grads,
    hand_restore,
)
from ssah_plugin.testing.trainers import HandMaskedTrainer, HandRestore, grad_norms

pytestmark = pytest.mark.usefixtures("deterministic")

PRECISIONS = ["fp32", "bf16"]
SNAPSHOTS = ["param", "cpu"]
UNITS = {"model.layers.0.mlp": [0, 3, 127], "model.layers.0.self_attn": [1, 17, 33],
         "model.layers.1.mlp": [64], "model.layers.1.self_attn": [0, 63]}
MAX_GRAD_NORM = 0.01


def _model(family: str = "llama"):
    return tiny_model(family, seed=0, attn_implementation="eager")


def _need_bf16(device: torch.device, precision: str) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(device)} has no bf16 support")


def _assert_frozen_exact_rest_moved(dense, base, model) -> None:
    params = dict(model.named_parameters())
    assert dense
    for name, m in dense.items():
        p, b = params[name].detach().cpu(), base[name].cpu()
        m = m.cpu()
        assert m.any() and not m.all()
        assert torch.equal(p[m], b[m].to(p.dtype)), f"frozen elements of {name} changed"
        assert not torch.equal(p[~m], b[~m].to(p.dtype)), f"unfrozen elements of {name} did not train"


def _assert_same_model(a, b) -> None:
    pb = dict(b.named_parameters())
    for name, p in a.named_parameters():
        assert torch.equal(p, pb[name]), f"{name} differs from the reference"


# ---------------------------------------------------------------------------------------------- Trainer + callback
def _args(out, device: torch.device, precision: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=1e-2, weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="linear",
        warmup_steps=1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=device.type == "cpu",
        bf16=precision == "bf16", seed=0, disable_tqdm=True, dataloader_num_workers=0)


@pytest.mark.parametrize("snapshot", SNAPSHOTS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_trainer_callback_bitwise(torch_device, precision, snapshot, tmp_path):
    _need_bf16(torch_device, precision)
    if torch_device.type == "cuda" and torch.cuda.device_count() > 1:
        pytest.skip("the Trainer would wrap the model in DataParallel over every visible GPU; "
                    "run with CUDA_VISIBLE_DEVICES=<one GPU>")
    model = _model()
    mask = Mask.from_units(model, UNITS)
    base = clone_params(model)
    dense = dense_frozen_masks(mask, model)
    ref_model = copy.deepcopy(model)
    ds = lm_rows()  # a plain list: no `datasets` package needed on the GPU machine

    cb = SSAHCallback(mask, snapshot_device=snapshot)
    trainer = Trainer(model=model, args=_args(tmp_path / "a", torch_device, precision), train_dataset=ds,
                      callbacks=[cb])
    trainer.train()
    ref = HandMaskedTrainer(model=ref_model, args=_args(tmp_path / "b", torch_device, precision), train_dataset=ds,
                            callbacks=[HandRestore(dense, base)], dense=dense)
    ref.train()

    assert next(model.parameters()).device.type == torch_device.type
    assert trainer.state.global_step == 4 and cb.summary["steps"] == 4 and cb.summary["max_drift"] == 0.0
    assert cb.enforcer.snapshot_device == snapshot
    _assert_frozen_exact_rest_moved(dense, base, model)
    norms = grad_norms(trainer)
    assert len(norms) == 4 and norms == grad_norms(ref)  # exact float equality
    assert all(n > MAX_GRAD_NORM for n in norms)  # clipping really happened
    _assert_same_model(ref_model, model)


# ---------------------------------------------------------------------------------------------- custom loop
def _loop(model, opt, sched, batches, *, hand=None) -> list[torch.Tensor]:
    """forward, backward, [hand masking], clip, step, [hand restore], scheduler, zero_grad."""
    norms = []
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        if hand:
            hand_mask_grads(model, hand[0])
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
        opt.step()
        if hand:
            hand_restore(model, *hand)
        sched.step()
        opt.zero_grad(set_to_none=True)
    return norms


def _make_opt(model, mask=None, snapshot="param"):
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt = SSAHOptimizer(inner, model, mask, snapshot_device=snapshot) if mask is not None else inner
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))


@pytest.mark.parametrize("snapshot", SNAPSHOTS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_custom_loop_optimizer_bitwise(torch_device, precision, snapshot):
    _need_bf16(torch_device, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cpu_model = _model("mistral")
    mask = Mask.from_units(cpu_model, UNITS)  # made from the fp32 base, as `ssah-plugin locate` writes it
    model = cpu_model.to(device=torch_device, dtype=dtype)
    ref = copy.deepcopy(model)
    base = clone_params(model)
    dense = dense_frozen_masks(mask, model)
    batches = random_batches(5, device=torch_device)

    opt, sched = _make_opt(model, mask, snapshot)
    norms = _loop(model, opt, sched, batches)
    r_opt, r_sched = _make_opt(ref)
    r_norms = _loop(ref, r_opt, r_sched, batches, hand=(dense, base))

    assert opt.max_drift() == 0.0
    assert all(torch.equal(a, b) for a, b in zip(norms, r_norms))
    assert all(float(n) > 0.05 for n in norms)  # clipping triggered
    _assert_frozen_exact_rest_moved(dense, base, model)
    _assert_same_model(ref, model)


# ---------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("snapshot", SNAPSHOTS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_lora_optimizer_bitwise_after_merge(torch_device, precision, snapshot):
    pytest.importorskip("peft")
    import warnings

    from peft import LoraConfig, get_peft_model

    from ssah_plugin.core.units import describe_units
    from ssah_plugin.hosts.peft import compare_frozen_units

    _need_bf16(torch_device, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cpu_model = _model("llama")
    mask = Mask.from_units(cpu_model, {g.name: [1, 5, 6] for g in describe_units(cpu_model)})
    model = cpu_model.to(device=torch_device, dtype=dtype)
    base = copy.deepcopy(model)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj", "o_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pm = get_peft_model(model, lora)
    inner = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    opt = SSAHOptimizer(inner, pm, mask, snapshot_device=snapshot)
    for ids in random_batches(3, device=torch_device):
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert opt.max_drift() == 0.0
    merged = pm.merge_and_unload()
    assert next(merged.parameters()).device.type == torch_device.type
    rep = compare_frozen_units(mask, base, merged)
    assert rep["checked"] > 0 and rep["mismatched"] == [], rep
    assert rep["changed_unfrozen"] > 0, "nothing trained: the check would pass vacuously"
