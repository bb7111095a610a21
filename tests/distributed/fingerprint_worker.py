"""One rank of the ZeRO-3 fingerprint check (launched by ``test_zero3_fingerprint.py``).

Under ZeRO-3 each rank holds one contiguous partition of every parameter. The fingerprint check must read the 32
samples from the partitions (one small ``all_reduce``), never gather a whole tensor. Inside :func:`no_gather` every
gathering path raises (``deepspeed.zero.GatheredParameters``, ``deepspeed.comm`` and ``torch.distributed`` gathers
and broadcasts, the backend's bound all-gather) and every ``all_reduce`` is recorded with its size; the scenario
first shows that the patch does catch a gather (so the check can fail).

Scenarios (``worker.main`` scaffolding: markers, errors, resets, barriers):

* ``fpraw-z3-fp32`` / ``fpraw-z3-bf16``: a raw engine (no parameter persistence in fp32, DeepSpeed's default
  persistence in bf16, one step trained first). The right mask passes and a mask of other weights is refused, both
  inside :func:`no_gather`; the samples are compared bitwise with those of the gathered tensors (and, before any
  step, with the mask's own); an odd-sized parameter made under ``zero.Init`` checks the padded last partition.
* ``fpraw-z3-fp32-other``: ``deepspeed_enforce(engine, mask of other weights)`` inside :func:`no_gather`: must
  raise the fingerprint error on every rank (before any gather).
* ``fptrainer-z3-fp32`` / ``fptrainer-z3-fp32-other``: the model is built after ``TrainingArguments(deepspeed=
  zero3)``, so ``zero.Init`` partitions it at construction; ``Trainer(callbacks=[SSAHCallback(mask)])`` runs
  ``on_init_end`` inside :func:`no_gather`. The right mask then trains 3 steps bit-exactly; the other is refused
  at construction on every rank.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import worker as w  # this folder's shared worker (the script's folder is first on sys.path)


class GatherCalled(RuntimeError):
    """Raised by every gathering path inside :func:`no_gather`."""


@contextlib.contextmanager
def no_gather(log: list):
    """Make every gathering collective raise; record ``("all_reduce", numel)`` for every all_reduce."""
    import deepspeed
    import deepspeed.comm as dcomm
    import deepspeed.runtime.zero.partition_parameters as pp

    def refuse(what):
        def fn(*a, **k):
            log.append((what, -1))
            raise GatherCalled(f"{what} called while fingerprinting")
        return fn

    class NoGathered:
        def __init__(self, *a, **k):
            refuse("GatheredParameters")()

    real_all_reduce = torch.distributed.all_reduce

    def all_reduce(tensor, *a, **k):
        log.append(("all_reduce", int(tensor.numel())))
        return real_all_reduce(tensor, *a, **k)

    saved: list[tuple[object, str, object]] = []

    def patch(obj, name, value):
        if hasattr(obj, name):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)

    patch(deepspeed.zero, "GatheredParameters", NoGathered)
    patch(pp, "GatheredParameters", NoGathered)
    for name in ("all_gather", "all_gather_into_tensor", "allgather_fn", "all_gather_coalesced", "broadcast",
                 "all_gather_object", "reduce_scatter_fn", "reduce_scatter_tensor"):
        patch(dcomm, name, refuse(f"deepspeed.comm.{name}"))
    for name in ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object", "broadcast",
                 "reduce_scatter_tensor"):
        patch(torch.distributed, name, refuse(f"torch.distributed.{name}"))
    cdb = getattr(dcomm.comm, "cdb", None)
    for name in ("all_gather_function", "all_gather", "all_gather_into_tensor", "broadcast",
                 "all_gather_coalesced"):
        patch(cdb, name, refuse(f"backend.{name}"))
    patch(torch.distributed, "all_reduce", all_reduce)
    try:
        yield log
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _gathered_samples(params: dict) -> dict[str, torch.Tensor]:
    """Fingerprint samples of the whole tensors, gathered (outside no_gather): the reference."""
    import deepspeed

    from ssah_plugin.core.fingerprint import fingerprint_samples

    out = {}
    for name, p in params.items():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            out[name] = fingerprint_samples(p.data)
    return out


def _fingerprinted(mask, model) -> dict:
    from ssah_plugin.core.peft_layout import find_weight
    from ssah_plugin.core.units import unwrap_model

    root = unwrap_model(model)
    return {n: find_weight(root, *n.rsplit(".", 1)) for n in mask.fingerprint}


def _other_mask():
    from ssah_plugin import Mask
    from ssah_plugin.io.tiny import tiny_model

    return Mask.from_units(tiny_model("llama", seed=1), w.FROZEN)


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def run_raw(sc: w.Scenario) -> dict:
    import deepspeed

    import ssah_plugin
    from ssah_plugin.errors import MaskMismatchError
    from ssah_plugin.hosts.zero3_read import (
        gather_full,
        validate_mask,
        zero3_fingerprint_getter,
        zero3_fingerprint_samples,
    )

    w.init_distributed()
    dtype = torch.bfloat16 if sc.bf16 else torch.float32
    model, mask, _, _ = w.build(dtype)
    other = _other_mask()
    zero = {"stage": 3}
    if not sc.bf16:
        zero["stage3_param_persistence_threshold"] = 0  # nothing kept whole: every value lives in partitions only
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": zero,
           "bf16": {"enabled": sc.bf16}, "steps_per_print": 10**6, "zero_allow_untested_optimizer": True}
    opt = torch.optim.AdamW(model.parameters(), lr=w.LR)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    res: dict = {"partitioned": sum(hasattr(p, "ds_tensor") for p in engine.module.parameters())}
    if sc.flags.get("other"):
        log: list = []
        with no_gather(log):
            ssah_plugin.deepspeed_enforce(engine, other)  # must raise the fingerprint error, before any gather
        return res
    trained = sc.bf16
    if trained:  # persistent parameters now also hold their whole value in p.data
        ids = torch.tensor([w.lm_dataset()[w.rank()]["input_ids"]] * 2, device=engine.device)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    params = _fingerprinted(mask, engine.module)
    with deepspeed.zero.Init(config_dict_or_path=cfg):  # odd sizes: the last partition is padded
        torch.manual_seed(3)
        lin = torch.nn.Linear(7, 5)
    odd = {"weight": lin.weight, "bias": lin.bias}
    log = []
    with no_gather(log):
        try:
            gather_full("probe", next(iter(params.values())))
            res["patch_catches_gather"] = False
        except GatherCalled:
            res["patch_catches_gather"] = True
        log.clear()
        get = zero3_fingerprint_getter(mask, engine.module)  # the one collective
        samples = {n: get(n, p) for n, p in params.items()}
        res["collectives_getter"] = list(log)
        log.clear()
        if not trained:
            validate_mask(mask, engine.module)  # the right model passes
        try:
            validate_mask(other, engine.module)
            res["other_error"] = None
        except MaskMismatchError as exc:
            res["other_error"] = str(exc)
        res["collectives_validate"] = list(log)
        log.clear()
        odd_samples = zero3_fingerprint_samples(odd)
        res["collectives_odd"] = list(log)
    res["odd_numel"] = [int(p.ds_numel) for p in odd.values()]
    res["odd_partition"] = [int(p.ds_tensor.numel()) for p in odd.values()]
    res["odd_equal_gathered"] = _equal(odd_samples, _gathered_samples(odd))
    res["n_fingerprinted"] = len(samples)
    res["samples_equal_gathered"] = _equal(samples, _gathered_samples(params))
    res["samples_equal_mask"] = _equal(samples, {n: mask.fingerprint[n] for n in samples})
    res["persisted"] = sum(bool(getattr(p, "ds_persist", False)) for p in params.values())
    enforcer = ssah_plugin.deepspeed_enforce(engine, mask, check_fingerprint=not trained)  # the full set-up path
    res["enforcer"] = type(enforcer).__name__
    enforcer.detach()
    return res


def run_trainer(sc: w.Scenario) -> dict:
    import deepspeed
    from transformers import Trainer, TrainingArguments

    from ssah_plugin import Mask, SSAHCallback, plan_frozen_slices
    from ssah_plugin.io.tiny import tiny_model

    dtype = torch.bfloat16 if sc.bf16 else torch.float32
    plain = tiny_model("llama", seed=0, dtype=dtype)  # built before the ZeRO-3 config exists: whole tensors
    other = _other_mask() if sc.flags.get("other") else None
    args = w.train_args(TrainingArguments, sc.tmp, sc.bf16, 3, sc.flags)  # sets the ZeRO-3 config for zero.Init
    model = tiny_model("llama", seed=0, dtype=dtype)
    res: dict = {"partitioned_at_build": all(hasattr(p, "ds_tensor") for p in model.parameters())}
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        plain.load_state_dict({n: p.data.detach().clone() for n, p in model.named_parameters()}, strict=False)
    mask = Mask.from_units(plain, w.FROZEN)  # the right mask: made from the partitioned model's own weights
    ref = {s.name: s.param.detach().index_select(s.axis, s.index).clone()
           for s in plan_frozen_slices(mask, plain, None)}
    full = {n: p.detach().clone() for n, p in plain.named_parameters()}
    del plain
    cb = SSAHCallback(other if other is not None else mask)
    log: list = []
    real_init_end = cb.on_init_end

    def guarded_init_end(*a, **k):  # only the plugin's hook runs without gathers (the Trainer may communicate)
        log.append(("on_init_end", 0))
        with no_gather(log):
            return real_init_end(*a, **k)

    cb.on_init_end = guarded_init_end  # the callback handler looks the hook up on the instance
    trainer = Trainer(model=model, args=args, train_dataset=w.lm_dataset(), callbacks=[cb])
    del cb.on_init_end
    res["collectives_init"] = list(log)
    trainer.train()
    res.update(w.measure(trainer.model_wrapped.module, mask, ref, full, True, cb.enforcer))
    res["global_step"] = trainer.state.global_step
    return res


def run(sc: w.Scenario) -> dict:
    return run_raw(sc) if sc.host == "fpraw" else run_trainer(sc)


if __name__ == "__main__":
    sys.exit(w.main(sys.argv[1:], run))
