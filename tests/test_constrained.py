"""TokenwiseConstraint (Qi et al. 2024, Eq. 3) attached to Trainer and TRL SFTTrainer (``constraint.attach(trainer)``).

The loss is checked against an independent float64 computation (each sequence run alone, unpadded); the Trainer runs
check normalisation (accumulation 2 == one batch of 2), the beta schedule seen through real collators (TRL chat
data, padding-free packing), that the reference never changes, and that SSAHCallback's frozen units stay bit-exact.
Where the policy equals the aligned model (first step), every log-ratio is exactly 0 and the loss is
``log 2 * mean_t(2 / beta_t)``: a value that only depends on the response positions.
"""
from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from ssah_plugin.core.mask import Mask
from ssah_plugin.errors import UnsupportedSetupError
from ssah_plugin.hosts.callback import SSAHCallback
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer
from ssah_plugin.recipes.constrained import (
    PAPER_BETA_REST,
    PAPER_BETAS,
    TokenwiseConstraint,
    beta_schedule,
    response_positions,
)
from ssah_plugin.testing.data import pad_collate as _collate
from ssah_plugin.testing.data import prompt_reply_rows as _rows
from ssah_plugin.testing.oracles import frozen_values
from ssah_plugin.testing.trainers import logged_losses as _losses

LOG2 = math.log(2.0)
UNITS = {"model.layers.0.mlp": [0, 9, 100], "model.layers.0.self_attn": [2, 40], "model.layers.1.mlp": [5],
         "model.layers.1.self_attn": [63]}


def _beta(k: int) -> float:
    return PAPER_BETAS[k] if k < len(PAPER_BETAS) else PAPER_BETA_REST


def _init_loss(lengths: list[int]) -> float:
    """Loss when policy == reference: log 2 * sum over responses of sum_k 2/beta_k, over the token count."""
    return LOG2 * sum(2 / _beta(k) for n in lengths for k in range(n)) / sum(lengths)


def _hand_loss(policy, reference, rows, betas=PAPER_BETAS, beta_rest=PAPER_BETA_REST, denom=None) -> float:
    """Independent float64 reference: each (input_ids, labels) row alone, no padding, explicit loop over tokens."""
    pol, ref = copy.deepcopy(policy).double().eval(), copy.deepcopy(reference).double().eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            x = torch.tensor([ids])
            lp = pol(input_ids=x).logits[0].log_softmax(-1)
            lr = ref(input_ids=x).logits[0].log_softmax(-1)
            k = 0
            for t in range(1, len(ids)):
                if labels[t] == -100:
                    continue
                d = float(lp[t - 1, labels[t]] - lr[t - 1, labels[t]])
                b = betas[k] if k < len(betas) else beta_rest
                total += (2 / b) * math.log1p(math.exp(-b * d))
                n += 1
                k += 1
    return total / (n if denom is None else denom)


# ---------------------------------------------------------------------------------------------- pure pieces
def test_response_positions_and_beta_schedule():
    t = torch.tensor([[-100, -100, 7, 8, 9, 10, 11, 12, 13, -100],
                      [-100, 4, 5, -100, -100, -100, -100, -100, -100, -100]])
    pos = response_positions(t)
    assert pos.tolist() == [[-1, -1, 0, 1, 2, 3, 4, 5, 6, -1], [-1, 0, 1, -1, -1, -1, -1, -1, -1, -1]]
    b = beta_schedule(pos)
    assert b[0, 2:9].tolist() == [0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.1]
    assert b.dtype == torch.float64
    assert beta_schedule(torch.tensor([0, 1, 2]), betas=(1.0,), beta_rest=3.0).tolist() == [1.0, 3.0, 3.0]
    # padding-free packing: position_ids restart at 0 where a new sequence begins; counting restarts there
    packed = torch.tensor([[-100, 5, 6, 7, -100, 8, 9, -100, 1, 2]])
    position_ids = torch.tensor([[1, 2, 3, 4, 0, 1, 2, 0, 1, 2]])  # taken at the targets' own positions
    assert response_positions(packed, position_ids).tolist() == [[-1, 0, 1, 2, -1, 0, 1, -1, 0, 1]]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_loss_matches_hand_computation_with_padding(family):
    policy, reference = tiny_model(family, seed=0), tiny_model(family, seed=1)
    with torch.no_grad():  # sharpen the reference: log-ratios of several nats, into the saturating regime
        reference.lm_head.weight.mul_(30)
    rows = [([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [-100, -100, -100, 8, 9, 10, 11, 12, 13, 14, 15]),
            ([20, 21, 22, 23, 24], [-100, -100, 22, 23, 24])]
    batch = _collate([{"input_ids": i, "labels": lab} for i, lab in rows])
    c = TokenwiseConstraint(reference, copy=False)
    c._attach(policy)
    out = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = c(out, batch["labels"])
    hand = _hand_loss(policy, reference, rows)
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert abs(hand - _init_loss([8, 3])) > 0.5  # the models really differ: not the trivial value
    # num_items_in_batch (the accumulated count) replaces the local count
    out = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss2 = c(out, batch["labels"], num_items_in_batch=torch.tensor(22))
    assert loss2.item() == pytest.approx(_hand_loss(policy, reference, rows, denom=22), rel=1e-5)
    # other betas
    c3 = TokenwiseConstraint(reference, copy=False, betas=(1.0, 3.0), beta_rest=0.5)
    c3._attach(policy)
    out = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert c3(out, batch["labels"]).item() == pytest.approx(
        _hand_loss(policy, reference, rows, betas=(1.0, 3.0), beta_rest=0.5), rel=1e-5)
    c.close()
    c3.close()


def test_gradient_is_paper_weighting_of_cross_entropy():
    """d loss_t / d log pi_theta = -2 (1 - sigmoid(beta_t * Delta_t)): the paper's Appendix D gradient."""
    from ssah_plugin.recipes.tokenwise import tokenwise_loss

    lp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    lr = torch.tensor([-1.5, -1.0, -4.0], dtype=torch.float64)
    b = torch.tensor([0.5, 2.0, 0.1], dtype=torch.float64)
    tokenwise_loss(lp, lr, b).sum().backward()
    assert torch.allclose(lp.grad, -2 * (1 - torch.sigmoid(b * (lp.detach() - lr))), atol=1e-12)


def test_reference_follows_an_engine_cast_of_parameters():
    """DeepSpeed bf16 casts the model's parameters (buffers such as rotary inv_freq stay float32): the reference is
    cast the same way at on_train_begin, so the two forwards agree bitwise (casting buffers too would not)."""
    model = tiny_model("llama", seed=0)
    c = TokenwiseConstraint(model)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    c._place_reference(model)
    assert {p.dtype for p in c.reference.parameters()} == {torch.bfloat16}
    assert c.reference.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, c.reference(input_ids=ids).logits)


# ---------------------------------------------------------------------------------------------- Trainer
def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=1,
                learning_rate=1e-2, weight_decay=0.0, max_grad_norm=1e9, lr_scheduler_type="constant",
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0, remove_unused_columns=False)
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_accumulation_equals_one_batch(tmp_path):
    """Reply lengths 3 and 12: accumulation 2 x batch 1 == one batch of 2 (a per-micro-batch mean would differ)."""
    ds = _rows([(4, 3), (2, 12)])
    runs = {}
    for name, bs, ga in (("one", 2, 1), ("acc", 1, 2)):
        model = tiny_model("llama", seed=0)
        c = TokenwiseConstraint(model)
        t = c.attach(Trainer(model=model, args=_args(tmp_path / name, per_device_train_batch_size=bs,
                                                     gradient_accumulation_steps=ga, optim="sgd"),
                             train_dataset=ds, data_collator=_collate))
        t.train()
        runs[name] = (model, _losses(t), c)
    (m1, l1, c1), (m2, l2, c2) = runs["one"], runs["acc"]
    # the reply tokens predicted: 3 and 12 (labels[0] of the second row is masked anyway)
    assert l1[0] == pytest.approx(_init_loss([3, 12]), rel=1e-6)
    assert l2[0] == pytest.approx(l1[0], rel=1e-6)
    assert c1.calls == 1 and c2.calls == 2
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), n
    base = tiny_model("llama", seed=0)
    assert not torch.equal(m1.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_with_ssah_freezing_reference_untouched(tmp_path, bf16):
    model = tiny_model("llama", seed=0)
    mask = Mask.from_units(model, UNITS)
    frozen_before = frozen_values(mask, model)
    full_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    c = TokenwiseConstraint(model)
    ref_before = {n: p.detach().clone() for n, p in c.reference.named_parameters()}
    ds = _rows([(3, 9)] * 8)
    cb = SSAHCallback(mask)
    t = c.attach(Trainer(model=model, args=_args(tmp_path, max_steps=4, gradient_accumulation_steps=2,
                                                 weight_decay=0.1, max_grad_norm=0.05, bf16=bf16),
                         train_dataset=ds, data_collator=_collate, callbacks=[cb]))
    t.train()
    losses = _losses(t)
    # first step: policy == reference under the same autocast, so Delta is exactly 0 on every token
    assert losses[0] == pytest.approx(_init_loss([9]), rel=1e-6)
    first = next(r for r in t.state.log_history if "loss" in r)
    assert first["tokenwise/logratio_prefix"] == 0.0 and first["tokenwise/logratio_rest"] == 0.0
    later = [r for r in t.state.log_history if "loss" in r][-1]
    assert later["tokenwise/logratio_rest"] != 0.0  # the policy moved away from the reference
    # the reference never changes, never gets gradients, stays in eval mode
    for n, p in c.reference.named_parameters():
        assert torch.equal(p, ref_before[n]), n
        assert not p.requires_grad and p.grad is None
    assert not c.reference.training
    # frozen units bit-exact, the rest trained
    assert cb.summary["max_drift"] == 0.0
    for name, v in frozen_values(mask, model).items():
        assert torch.equal(v, frozen_before[name]), name
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(model.get_parameter(w), full_before[w])


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3", "gpt2"])
def test_eval_uses_the_constraint_too(tmp_path, family):
    model = tiny_model(family, seed=0)
    c = TokenwiseConstraint(model)
    ds = _rows([(3, 5), (3, 5)])
    t = c.attach(Trainer(model=model, args=_args(tmp_path), train_dataset=ds, eval_dataset=ds,
                         data_collator=_collate))
    metrics = t.evaluate()  # before any train(): the reference is placed lazily
    assert metrics["eval_loss"] == pytest.approx(_init_loss([5]), rel=1e-6)


# ---------------------------------------------------------------------------------------------- TRL
trl = pytest.importorskip("trl")


def _chat_rows(n: int = 16) -> Dataset:
    # identical replies (the first-step loss then does not depend on which rows were drawn), distinct prompts
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"Name colour number {i} please."},
                                            {"role": "assistant", "content": "Blue, like the sky."}]}
                              for i in range(n)])


def _reply_tokens(tok) -> int:
    """Trained tokens per row with assistant_only_loss: the reply and its <|im_end|>."""
    return len(tok("Blue, like the sky.", add_special_tokens=False)["input_ids"]) + 1


def _sft_args(out, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                learning_rate=1e-2, weight_decay=0.1, logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, bf16=False,
                gradient_checkpointing=True, max_length=64, assistant_only_loss=True)
    base.update(kw)
    return SFTConfig(**base)


def test_sft_trainer_with_freezing(tmp_path):
    from trl import SFTTrainer

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=0)
    mask = Mask.from_units(model, UNITS)
    frozen_before = frozen_values(mask, model)
    c = TokenwiseConstraint(model)
    ref_before = {n: p.detach().clone() for n, p in c.reference.named_parameters()}
    cb = SSAHCallback(mask)
    t = c.attach(SFTTrainer(model=model, args=_sft_args(tmp_path), train_dataset=_chat_rows(),
                            processing_class=tok, callbacks=[cb]))
    t.train()
    k = _reply_tokens(tok)
    assert _losses(t)[0] == pytest.approx(_init_loss([k]), rel=1e-6)
    assert c.calls == 6  # 3 steps x 2 micro-batches (TRL's second, no-grad metrics forward is not counted)
    for n, p in c.reference.named_parameters():
        assert torch.equal(p, ref_before[n]), n
    for name, v in frozen_values(mask, model).items():
        assert torch.equal(v, frozen_before[name]), name
    assert cb.summary["max_drift"] == 0.0
    assert _losses(t)[-1] < _losses(t)[0]


def test_sft_trainer_lora_and_padding_free_packing(tmp_path):
    """LoRA (TRL wraps the model after the copy was made: B = 0, so Delta = 0 at first) and BFD packing: the
    positions restart at every packed sequence (else most tokens would get beta 0.1 and the loss would differ)."""
    from peft import LoraConfig
    from trl import SFTTrainer

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=0)
    c = TokenwiseConstraint(model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    t = c.attach(SFTTrainer(model=model, args=_sft_args(tmp_path, packing=True, packing_strategy="bfd",
                                                        max_length=128, per_device_train_batch_size=1,
                                                        gradient_accumulation_steps=1, max_steps=2),
                            train_dataset=_chat_rows(), processing_class=tok, peft_config=lora))
    batch = next(iter(t.get_train_dataloader()))
    assert "position_ids" in batch and int(batch["position_ids"].eq(0).sum()) > 1  # really packed
    t.train()
    assert _losses(t)[0] == pytest.approx(_init_loss([_reply_tokens(tok)]), rel=1e-6)
    assert c.calls == 2


# ---------------------------------------------------------------------------------------------- refusals
def test_setup_errors(tmp_path):
    model = tiny_model("llama", seed=0)
    ds = _rows([(3, 5)] * 4)
    with pytest.raises(ValueError, match="finite number > 0"):
        TokenwiseConstraint(model, betas=(0.5, 0.0))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        TokenwiseConstraint("model")  # type: ignore[arg-type]
    c = TokenwiseConstraint(model)
    with pytest.raises(TypeError, match="transformers.Trainer"):
        c.attach(model)
    with pytest.raises(UnsupportedSetupError, match="label_smoothing_factor"):
        c.attach(Trainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.1), train_dataset=ds,
                         data_collator=_collate))
    with pytest.raises(UnsupportedSetupError, match="already has a compute_loss_func"):
        c.attach(Trainer(model=model, args=_args(tmp_path), train_dataset=ds, data_collator=_collate,
                         compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum()))
    first = c.attach(Trainer(model=model, args=_args(tmp_path), train_dataset=ds, data_collator=_collate))
    assert c.trainer is first and first.compute_loss_func is c
    with pytest.raises(UnsupportedSetupError, match="another trainer"):
        c.attach(Trainer(model=model, args=_args(tmp_path), train_dataset=ds, data_collator=_collate))
    same = TokenwiseConstraint(model, copy=False)  # the trained model as its own reference
    with pytest.raises(UnsupportedSetupError, match="shares parameters"):
        same.attach(Trainer(model=model, args=_args(tmp_path), train_dataset=ds, data_collator=_collate))


@pytest.mark.parametrize("passed", ["loss-and-callback", "loss-only"])
def test_without_attach_refused_before_any_weight_changes(tmp_path, passed):
    """The pre-attach usage (compute_loss_func=constraint[, callbacks=[constraint]]) is refused at train() with the
    fix, before any step: at on_train_begin when it is a callback, else at the first loss call (before backward)."""
    model = tiny_model("llama", seed=0)
    c = TokenwiseConstraint(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    extra = {"callbacks": [c]} if passed == "loss-and-callback" else {}
    t = Trainer(model=model, args=_args(tmp_path), train_dataset=_rows([(3, 5)] * 4), data_collator=_collate,
                compute_loss_func=c, **extra)
    with pytest.raises(UnsupportedSetupError, match=r"constraint\.attach\(trainer\)"):
        t.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


class _OwnLoss(Trainer):
    """A trainer whose compute_loss ignores compute_loss_func (as DPOTrainer's does)."""

    fused = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.fused:
            return model(**inputs, fused_lm_head=True).loss
        return model(**inputs).loss


@pytest.mark.parametrize("fused", [False, True], ids=["own-loss", "fused-head"])
def test_trainer_ignoring_the_loss_is_refused_before_any_gradient(tmp_path, fused):
    """The refusal fires in backward when the gradient reaches the logits (own loss), or before the forward (fused
    head): no parameter gradient exists yet, so no optimizer (DeepSpeed's runs inside backward) can have stepped."""
    model = tiny_model("llama", seed=0)
    c = TokenwiseConstraint(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = c.attach(_OwnLoss(model=model, args=_args(tmp_path), train_dataset=_rows([(3, 5)] * 4),
                          data_collator=_collate))
    t.fused = fused
    with pytest.raises(UnsupportedSetupError, match="did not come from TokenwiseConstraint"):
        t.train()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class _Reporter(TrainerCallback):
    def __init__(self):
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_metrics_reach_callbacks_that_report(tmp_path):
    """attach() puts the constraint first, so a reporting callback (here one passed by the user, which runs after
    the Trainer's own TensorBoard / W&B callbacks too) receives the tokenwise/* entries of the same record."""
    model = tiny_model("llama", seed=0)
    c = TokenwiseConstraint(model)
    reporter = _Reporter()
    t = c.attach(Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_rows([(3, 5)] * 4),
                         data_collator=_collate, callbacks=[reporter]))
    assert t.callback_handler.callbacks[0] is c and t.compute_loss_func is c
    t.train()
    first = next(r for r in reporter.seen if "loss" in r)
    assert first["tokenwise/logratio_prefix"] == 0.0 and "tokenwise/logratio_rest" not in first  # 5-token replies


def test_refuses_zero3_and_encoder_decoder():
    model = tiny_model("llama", seed=0)
    p = next(model.parameters())
    p.ds_id, p.ds_tensor = 0, torch.zeros(1)  # what a ZeRO-3 partitioned parameter carries
    with pytest.raises(UnsupportedSetupError, match="ZeRO-3.*Fix: use ZeRO-2"):
        TokenwiseConstraint(model)
    enc_dec = torch.nn.Linear(2, 2)
    enc_dec.config = types.SimpleNamespace(is_encoder_decoder=True)
    with pytest.raises(UnsupportedSetupError, match="encoder-decoder"):
        TokenwiseConstraint(enc_dec)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_refuses_wrapped_packing_and_dpo(tmp_path):
    from trl import DPOConfig, DPOTrainer, SFTTrainer

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=0)
    c = TokenwiseConstraint(model)
    with pytest.raises(UnsupportedSetupError, match="packing_strategy='wrapped'.*Fix"):
        c.attach(SFTTrainer(model=model, args=_sft_args(tmp_path, packing=True, packing_strategy="wrapped",
                                                        assistant_only_loss=False),
                            train_dataset=_chat_rows(), processing_class=tok))
    rows = [{"prompt": f"Question {i}?", "chosen": " Yes.", "rejected": " No."} for i in range(4)]
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                     use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=32, save_strategy="no")
    with pytest.raises(UnsupportedSetupError, match="loss_type.*Fix"):
        c.attach(DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                            train_dataset=Dataset.from_list(rows), processing_class=tok))
