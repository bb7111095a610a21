"""One rank of a multi-process check: runs several training scenarios in sequence, writes one marker per scenario.

Launched by :mod:`tests.distributed.launch` (``torchrun --nproc_per_node 2``, gloo, ``DS_ACCELERATOR=cpu``)::

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/worker.py OUT_DIR scenario [scenario ...]

A scenario name is ``host-stage-dtype[-flag...]``: host in trainer / sft / dpo / raw / ddp; stage z0..z3 (or ddp);
dtype fp32 / bf16; flags: ``lora``, ``dsopt`` (DeepSpeed config ``"optimizer"`` block), ``resume`` (save, then
resume from the checkpoint in a second Trainer), ``offload`` (expects a refusal), ``ga1`` (no accumulation),
``control`` (the same job without the plugin: drift must show, proving the check can fail), with ``resume``:
``noplugin`` (the saved run had no plugin: the resume must be refused), ``wider`` (the resume freezes a wider
stored policy than the saved run: refused), ``addcb`` (the saved run had no plugin and the resume adds the callback
with ``trainer.add_callback``: refused); ``ssahopt``
(``Trainer(optimizers=(SSAHOptimizer(...), None))`` instead of the callback: refused under ZeRO), ``gc`` (gradient
checkpointing on, TRL's default).
Each rank writes ``OUT_DIR/<scenario>.rank<r>.json`` with the measured drifts (or the error raised), so the test
asserts on markers rather than on the launcher's exit code (DeepSpeed on CPU occasionally aborts at exit).

The scaffolding (:func:`main`: parse each ``host-stage-dtype[-flag...]`` name into a :class:`Scenario`, run it, write
the marker or the error, reset the hosts' global state, barrier) is shared by the other workers of this folder, which
pass their own runner: ``worker.main(argv, runner)``.

Drift is measured against values saved before training: the frozen slices of the original model, read back after
training from the fp32 master weights (``safe_get_full_fp32_param``) and from the model's copy (gathered under
ZeRO-3), plus the enforcer's own local check on this rank.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
#: chosen by launch.py: "nccl" (one CUDA device per rank) or "gloo" (CPU)
BACKEND = os.environ.get("SSAH_DIST_BACKEND", "gloo")

STEPS = 3
LR = 1e-2
WD = 0.1
FROZEN = {"model.layers.0.mlp": [1, 5, 9, 40, 77], "model.layers.1.self_attn": list(range(16, 24)),
          "model.layers.1.mlp": [0, 127]}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def device() -> torch.device:
    """This rank's device: its own GPU under NCCL, else the CPU."""
    if BACKEND == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed() -> None:
    """The process group for raw DeepSpeed scenarios (Trainer scenarios get theirs from TrainingArguments)."""
    import deepspeed

    if BACKEND == "nccl":
        torch.cuda.set_device(device())
    deepspeed.init_distributed(BACKEND)


def ds_config(stage: int, *, dsopt: bool = False, offload: bool = False) -> dict:
    cfg = json.loads((ROOT / "integrations" / "deepspeed" / f"zero{stage}.json").read_text())
    if dsopt:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                        "eps": "auto", "torch_adam": True}}
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def reset_hosts() -> None:
    """Forget accelerate's singleton state and transformers' global ZeRO-3 config between scenarios."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    # TrainingArguments(deepspeed=...) exports this for accelerate; a later DDP scenario in the same process
    # would otherwise be built as a DeepSpeed job.
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()


# ---------------------------------------------------------------------------------------------- model, data, mask
def build(dtype: torch.dtype):
    from ssah_plugin import Mask, plan_frozen_slices
    from ssah_plugin.io.tiny import tiny_model

    model = tiny_model("llama", seed=0, dtype=dtype)
    mask = Mask.from_units(model, FROZEN)
    wide = Mask.from_units(model, {**FROZEN, "model.layers.0.self_attn": [0, 1, 2]}, policy="wide")
    mask.stored["wide"] = wide.stored["wide"]  # a superset of the default policy, for the wider-policy resume
    ref = {s.name: s.param.detach().index_select(s.axis, s.index).clone()
           for s in plan_frozen_slices(mask, model, None)}
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model, mask, ref, full


def lm_dataset(n: int = 32, length: int = 24):
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (n, length), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})


def chat_rows(n: int = 32) -> list[dict]:
    from ssah_plugin.data import shipped_data_path

    rows = []
    with open(shipped_data_path("benign_instructions.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            rows.append({"prompt": r["instruction"][:80], "answer": r["output"][:80]})
            if len(rows) >= n + 1:
                break
    return rows


def sft_dataset():
    from datasets import Dataset

    rows = chat_rows()
    return Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["answer"]}]} for r in rows[:-1]])


def dpo_dataset():
    from datasets import Dataset

    rows = chat_rows()
    return Dataset.from_list([{"prompt": [{"role": "user", "content": a["prompt"]}],
                               "chosen": [{"role": "assistant", "content": a["answer"]}],
                               "rejected": [{"role": "assistant", "content": b["answer"]}]}
                              for a, b in zip(rows[:-1], rows[1:])])


# ---------------------------------------------------------------------------------------------- checks
def full_values(p: torch.nn.Parameter, zero: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(fp32 master or None, model copy) of ``p``, full-size. Collective under ZeRO: every rank calls in order."""
    master = None
    if zero and p.requires_grad:
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(p)
    if hasattr(p, "ds_tensor"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            model_copy = p.data.detach().clone()
    else:
        model_copy = p.data.detach().clone()
    if master is None and not zero and p.requires_grad:
        master = model_copy
    model_copy = model_copy.cpu()  # the values saved before training are on the CPU
    return (None if master is None else master.reshape(model_copy.shape).cpu()), model_copy


def measure(model, mask, ref: dict, full: dict, zero: bool, enforcer=None) -> dict:
    """Max drift of frozen values (master and model copy) vs the values saved before training; did others move?"""
    from ssah_plugin import plan_frozen_slices

    out = {"drift_master": 0.0, "drift_model": 0.0, "checked_master": 0, "checked_model": 0, "moved": 0.0,
           "lora_b_max": 0.0}
    for s in plan_frozen_slices(mask, model, None):
        master, copy_ = full_values(s.param, zero)
        if s.fill is not None:
            expect = torch.full_like(copy_.index_select(s.axis, s.index), s.fill)
        else:
            expect = ref[s.name]
        for key, val in (("master", master), ("model", copy_)):
            if val is None:
                continue
            cur = val.index_select(s.axis, s.index)
            e = expect.to(cur.dtype)
            d = 0.0 if torch.equal(cur, e) else float((cur.double() - e.double()).abs().max())
            out[f"drift_{key}"] = max(out[f"drift_{key}"], d)
            out[f"checked_{key}"] += 1
        if s.fill is None and s.param.requires_grad:
            base = full[s.name].to(copy_.dtype)
            out["moved"] = max(out["moved"], float((copy_.double() - base.double()).abs().max()))
    for n, p in model.named_parameters():  # LoRA: adapters must have trained (B starts at zero)
        if "lora_B" in n:
            _, v = full_values(p, zero)
            out["lora_b_max"] = max(out["lora_b_max"], float(v.abs().max()))
    if enforcer is not None:
        out["enforcer_drift"] = enforcer.max_drift()
        out["restores"] = getattr(enforcer, "restores", None)
        out["enforcer"] = type(enforcer).__name__
        for key in ("recorded_elements", "snapshot_bytes", "index_bytes", "frozen_elements"):
            out[key] = getattr(enforcer, key, None)
    return out


# ---------------------------------------------------------------------------------------------- hosts
def _probe_class():
    from transformers import TrainerCallback

    class _StepProbe(TrainerCallback):
        """After every optimizer step (``on_step_end``), this rank's local drift of master fragments + model copy."""

        def __init__(self, cb):
            self.cb, self.drifts = cb, []

        def on_step_end(self, args, state, control, **kwargs):
            if self.cb.enforcer is not None:
                self.drifts.append(self.cb.enforcer.max_drift())

    return _StepProbe


def StepProbe(cb):  # noqa: N802 - a class built lazily (transformers is imported inside the worker only)
    return _probe_class()(cb)


def train_args(cls, out: str, bf16: bool, stage: int | None, extra: dict, **kw):
    args = dict(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=extra.get("ga", 2),
                max_steps=STEPS, learning_rate=LR, weight_decay=WD, max_grad_norm=1.0, lr_scheduler_type="constant",
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=BACKEND != "nccl", bf16=bf16, seed=0,
                disable_tqdm=True, dataloader_num_workers=0, ddp_backend=BACKEND)
    if cls.__name__ in ("SFTConfig", "DPOConfig") or extra.get("gc"):
        args["gradient_checkpointing"] = bool(extra.get("gc"))  # TRL's default is on; "gc" scenarios keep it
    if stage is not None:
        args["deepspeed"] = ds_config(stage, dsopt=extra.get("dsopt", False), offload=extra.get("offload", False))
    args.update(kw)
    a = cls(**args)
    _ = a.device  # initialise the process group / accelerator state before any model is created (ZeRO-3)
    return a


def run_trainer_host(host: str, stage: int | None, bf16: bool, extra: dict, tmp: str) -> dict:
    from transformers import Trainer, TrainingArguments

    from ssah_plugin import SSAHCallback
    from ssah_plugin.hosts.zero import zero_stage
    from ssah_plugin.io.tiny import tiny_tokenizer

    dtype = torch.bfloat16 if bf16 else torch.float32
    model, mask, ref, full = build(dtype)
    tok = tiny_tokenizer()
    peft_config = None
    if extra.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "o_proj", "up_proj"],
                                 lora_dropout=0.0, task_type="CAUSAL_LM")
    cb = SSAHCallback(mask)
    probe = StepProbe(cb)
    callbacks = [] if extra.get("control") else [cb, probe]  # control: same job without the plugin

    def make(max_steps: int, save: bool, model, callbacks=callbacks):
        kw = dict(max_steps=max_steps)
        if save:
            kw.update(save_strategy="steps", save_steps=max_steps)
        if host == "trainer":
            args = train_args(TrainingArguments, tmp, bf16, stage, extra, **kw)
            if extra.get("ssahopt"):  # the optimizer route: SSAHOptimizer handed to a DeepSpeed Trainer
                from ssah_plugin import SSAHOptimizer

                opt = SSAHOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD), model, mask)
                return Trainer(model=model, args=args, train_dataset=lm_dataset(), optimizers=(opt, None))
            return Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=callbacks)
        if host == "sft":
            from trl import SFTConfig, SFTTrainer

            args = train_args(SFTConfig, tmp, bf16, stage, extra, max_length=64, **kw)
            return SFTTrainer(model=model, args=args, train_dataset=sft_dataset(), processing_class=tok,
                              callbacks=callbacks, peft_config=peft_config)
        from trl import DPOConfig, DPOTrainer

        args = train_args(DPOConfig, tmp, bf16, stage, extra, max_length=64, learning_rate=1e-3, beta=0.1, **kw)
        ref_model = None if peft_config is not None else copy.deepcopy(model)
        return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dpo_dataset(),
                          processing_class=tok, callbacks=callbacks, peft_config=peft_config)

    zero = stage is not None and stage > 0
    if extra.get("resume"):
        first_callbacks = [] if extra.get("noplugin") or extra.get("addcb") else callbacks
        trainer = make(2, save=True, model=model, callbacks=first_callbacks)
        trainer.train()
        first = measure(trainer.model, mask, ref, full, zero, cb.enforcer if first_callbacks else None)
        ckpt = os.path.join(tmp, "checkpoint-2")
        del trainer
        gc.collect()
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # as in a fresh process: the model is built before the training arguments
        model2 = build(dtype)[0]  # from the same base weights
        if extra.get("wider"):
            cb = SSAHCallback(mask, policy="wide")
            callbacks = [cb, probe]
        trainer = make(4, save=False, model=model2, callbacks=[] if extra.get("addcb") else callbacks)
        if extra.get("addcb"):
            trainer.add_callback(cb)
        trainer.train(resume_from_checkpoint=ckpt)
        res = measure(trainer.model, mask, ref, full, zero, cb.enforcer)
        res["first_phase"] = first
        res["global_step"] = trainer.state.global_step
    else:
        trainer = make(STEPS, save=False, model=model)
        trainer.train()
        res = measure(trainer.model, mask, ref, full, zero, cb.enforcer)
        res["global_step"] = trainer.state.global_step
    res["callback_steps"] = cb.summary.get("steps")
    res["per_step_drift"] = probe.drifts
    res["host_optimizer"] = [type(o).__name__ for o in _chain(trainer.optimizer)]
    res["zero_stage"] = zero_stage(trainer)
    res["frozen_elements"] = cb.summary.get("frozen_elements")
    return res


def _chain(opt) -> list:
    out = []
    while opt is not None and len(out) < 6:
        out.append(opt)
        opt = getattr(opt, "optimizer", None)
    return out


def run_raw(stage: int, bf16: bool, extra: dict, tmp: str) -> dict:
    import deepspeed

    import ssah_plugin
    from ssah_plugin.hosts.zero import zero_stage

    init_distributed()
    dtype = torch.bfloat16 if bf16 else torch.float32
    model, mask, ref, full = build(dtype)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "steps_per_print": 10**6,
           "zero_allow_untested_optimizer": True}
    if extra.get("offload"):
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    enforcer = ssah_plugin.deepspeed_enforce(engine, mask)
    data = lm_dataset()
    g = rank()
    for micro in range(STEPS * 2):
        row = data[(micro * 4 + g * 2) % len(data)]
        ids = torch.tensor([row["input_ids"], data[(micro * 4 + g * 2 + 1) % len(data)]["input_ids"]],
                           device=engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    res = measure(engine.module, mask, ref, full, stage > 0, enforcer)
    res["global_step"] = engine.global_steps
    res["zero_stage"] = zero_stage(engine)
    if extra.get("resume"):  # save, perturb nothing, load back into a fresh engine, train again
        engine.save_checkpoint(tmp, tag="ck")
        enforcer.detach()
        model2, _, _, _ = build(dtype)
        opt2 = torch.optim.AdamW(model2.parameters(), lr=LR, weight_decay=WD)
        engine2, _, _, _ = deepspeed.initialize(model=model2, optimizer=opt2, config=cfg)
        engine2.load_checkpoint(tmp, tag="ck")
        enforcer2 = ssah_plugin.deepspeed_enforce(engine2, mask, check_fingerprint=False)
        for micro in range(4):
            ids = torch.tensor([data[micro]["input_ids"], data[micro + 8]["input_ids"]], device=engine2.device)
            engine2.backward(engine2(input_ids=ids, labels=ids).loss)
            engine2.step()
        res["after_resume"] = measure(engine2.module, mask, ref, full, stage > 0, enforcer2)
    return res


@dataclass
class Scenario:
    """A scenario name ``host-stage-dtype[-flag...]`` parsed, with its working folder (shared by the ranks)."""

    name: str
    host: str
    stage: int | None  # None: DDP, no DeepSpeed
    bf16: bool
    flags: dict = field(default_factory=dict)
    tmp: str = ""

    @classmethod
    def parse(cls, name: str, out_dir: Path) -> Scenario:
        host, stage, dtype, *flags = name.split("-")
        extra: dict = {f: True for f in flags}
        if extra.pop("ga1", False):
            extra["ga"] = 1
        tmp = out_dir / "work" / name  # checkpoints are written by several ranks
        tmp.mkdir(parents=True, exist_ok=True)
        return cls(name, host, None if stage == "ddp" else int(stage[1:]), dtype == "bf16", extra, str(tmp))


Runner = Callable[[Scenario], dict]


def run_default(sc: Scenario) -> dict:
    """This module's scenarios: raw DeepSpeed engines, or Trainer / SFTTrainer / DPOTrainer hosts."""
    if sc.host == "raw":
        return run_raw(sc.stage, sc.bf16, sc.flags, sc.tmp)
    return run_trainer_host(sc.host, sc.stage, sc.bf16, sc.flags, sc.tmp)


def run_scenario(name: str, out_dir: Path, runner: Runner) -> None:
    """Run one scenario; write ``<name>.rank<r>.json``: the runner's result with ``ok``, or the error raised."""
    try:
        res = runner(Scenario.parse(name, out_dir))
        res["ok"] = True
    except Exception as exc:  # noqa: BLE001 - the test decides whether this error was expected
        res = {"ok": False, "error_type": type(exc).__name__, "error": str(exc)[:2000],
               "traceback": traceback.format_exc()[-4000:]}
    finally:
        reset_hosts()
    res.update(backend=BACKEND, device=str(device()))
    (out_dir / f"{name}.rank{rank()}.json").write_text(json.dumps(res, indent=1))


def main(argv: list[str], runner: Runner = run_default) -> int:
    """``argv`` = ``OUT_DIR scenario [scenario ...]``: run them in order on this rank, with a barrier after each."""
    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in argv[1:]:
        run_scenario(name, out_dir, runner)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    (out_dir / f"done.rank{rank()}").write_text("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
