"""Real-model study: does safety survive fine-tuning with ssah-plugin? (Qwen2.5-Coder-0.5B-Instruct, CPU)

Every stage is one call of this script (``python benchmarks/real_model/study.py STAGE``), writes its output under
``--root`` (default ``/work/cache/study``) with a ``.done`` marker, and is skipped when the marker exists, so the
whole study can be re-run after an interruption (``benchmarks/real_model/run_study.sh`` runs the stages in order).

Stages (see ``benchmarks/real_model/README.md`` for the budget and the exact commands):

* ``baseline``            refusal rate on the AdvBench ``eval`` split + benign held-out loss of the converted model
* ``calib``               the model's OWN replies to AdvBench ``calib`` prompts; those the judge scores as refusals
                          become the safety calibration set
* ``locate``              ``ssah_plugin.locate.locate`` on (own refusals, benign calibration subset) -> mask
* ``ablate-<set>``        refusal rate / benign loss with a unit set zeroed (``scu``, ``ru-matched``, ``ru``)
* ``ft-<data>-<policy>``  fine-tune (data: ``harmful`` / ``benign``; policy: ``none`` = no plugin, ``scu+cu6``,
                          ``scu+cu``) and save the checkpoint; plugin runs are verified against the base
* ``eval-<ft stage>``     refusal rate + benign loss of that checkpoint
* ``report``              table, JSON and plot under ``benchmarks/results/real_model/``

Harmful text never goes to the logs or to the repository: generated replies stay in the cache folder; results
keep only the judge's verdicts (and a sha256 per reply).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger("study")

REPO = Path(__file__).resolve().parents[2]
SHARED = Path("/work/shared/data")
DEFAULT_MODEL = "/work/cache/qwen2.5-coder-0.5b-instruct"
RESULTS = REPO / "benchmarks" / "results" / "real_model"

DATASETS = ("harmful", "benign")
POLICIES = ("none", "scu+cu6", "scu+cu", "ru-only")
ABLATIONS = ("scu", "ru-matched", "ru")  # each also as "<name>-out" (output column only)


# ---------------------------------------------------------------------------------------------------- settings
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", help="stage name (see module docstring)")
    p.add_argument("--root", default="/work/cache/study", help="cache folder for stage outputs and checkpoints")
    p.add_argument("--model", default=DEFAULT_MODEL, help="converted model folder (fetch_model.py)")
    p.add_argument("--eval-prompts", type=int, default=50, help="AdvBench eval prompts (the split has 100)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--calib-new-tokens", type=int, default=24, help="reply length for own refusals (stage calib)")
    p.add_argument("--gen-batch", type=int, default=25)
    p.add_argument("--calib-prompts", type=int, default=48, help="AdvBench calib prompts to answer (stage calib)")
    p.add_argument("--safety-samples", type=int, default=32, help="own refusals used by locate (at most)")
    p.add_argument("--utility-samples", type=int, default=32, help="benign calibration pairs used by locate")
    p.add_argument("--benign-eval", type=int, default=24, help="held-out benign pairs for the loss")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per fine-tuning run")
    p.add_argument("--batch", type=int, default=2, help="sequences per step")
    p.add_argument("--max-len", type=int, default=192, help="tokens per training sequence (prompt + reply)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--freeze-non-units", action="store_true",
                   help="fine-tuning: also freeze every parameter that belongs to no unit (embeddings, lm_head, "
                        "q/k projections, norms) with requires_grad=False (diagnostic; not what the plugin does)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: under the shared load, 2 threads ran 2.7x slower, see README)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- caching
def stage_dir(args: argparse.Namespace, name: str) -> Path:
    return Path(args.root) / name.replace("+", "_")


def load_result(args: argparse.Namespace, name: str) -> dict | None:
    d = stage_dir(args, name)
    if (d / ".done").exists():
        return json.loads((d / "result.json").read_text())
    return None


def run_stage(args: argparse.Namespace, name: str, fn: Callable[[Path], dict]) -> dict:
    """Run ``fn(out_dir)`` unless the stage's done-marker exists; store its result JSON and the marker."""
    done = load_result(args, name)
    if done is not None:
        log.info("stage %s: already done, skipped", name)
        return done
    d = stage_dir(args, name)
    d.mkdir(parents=True, exist_ok=True)
    if not _claim(d / ".running"):
        log.info("stage %s: running in another process, skipped here", name)
        return {}
    t0 = time.time()
    log.info("stage %s: start", name)
    try:
        result = fn(d)
    finally:
        (d / ".running").unlink(missing_ok=True)
    result["stage"] = name
    result["wall_s"] = round(time.time() - t0, 1)
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (d / "result.json").write_text(json.dumps(result, indent=1))
    (d / ".done").write_text("ok\n")
    log.info("stage %s: done in %.0f s", name, result["wall_s"])
    return result


def _claim(lock: Path) -> bool:
    """Take the stage's lock file (holding our pid) unless a live process holds it (two runners, one stage)."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text().strip() or 0), 0)
            return False
        except (ValueError, ProcessLookupError, PermissionError):
            lock.unlink(missing_ok=True)  # stale lock of a process that died
            return _claim(lock)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def need(args: argparse.Namespace, name: str) -> dict:
    r = load_result(args, name)
    if r is None:
        raise SystemExit(f"stage {name!r} has not finished yet; run it first")
    return r


# ---------------------------------------------------------------------------------------------------- data
def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def advbench(split: str) -> list[dict]:
    return [r for r in read_jsonl(SHARED / "advbench.jsonl") if r["split"] == split]


def benign_splits(seed: int) -> dict[str, list[dict]]:
    """Disjoint benign subsets: held-out eval = ``ssah_plugin.evaluate``'s ``benign:heldout`` rows (index 9 mod 10);
    the other rows, in one seeded permutation, give the utility calibration set (first 256) and fine-tuning data."""
    from ssah_plugin.evaluate import benign_split

    rows = read_jsonl(SHARED / "benign_instructions.jsonl")
    train = benign_split(rows, "train")
    perm = list(range(len(train)))
    random.Random(seed).shuffle(perm)
    return {"eval": benign_split(rows, "heldout"), "calib": [train[i] for i in perm[:256]],
            "finetune": [train[i] for i in perm[256:]]}


def benign_prompt(r: dict) -> str:
    return r["instruction"] + (("\n\n" + r["input"]) if r["input"] else "")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- model
def load(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def free(*objs: Any) -> None:
    for o in objs:
        del o
    gc.collect()


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_model(args: argparse.Namespace, model, tok, out: Path) -> dict:
    """Refusal rate on the AdvBench eval split (greedy, chat template) + benign held-out loss.

    Replies are written to ``out/replies.jsonl`` in the cache only; the result keeps verdicts and hashes.
    """
    from ssah_plugin.evaluate import attack_success_rate
    from ssah_plugin.judge import RefusalJudge

    prompts = [r["prompt"] for r in advbench("eval")[: args.eval_prompts]]
    partial = out / "replies.json"  # generation is cached on its own, so a failing loss does not redo it
    if partial.exists():
        cached = json.loads(partial.read_text())
        replies, gen_s = cached["replies"], cached["gen_s"]
    else:
        t0 = time.time()
        res = attack_success_rate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch)
        replies, gen_s = res["responses"], time.time() - t0
        partial.write_text(json.dumps({"replies": replies, "gen_s": gen_s}, ensure_ascii=False))
    judge = RefusalJudge()
    verdicts = [judge.verdict(t) for t in replies]
    with open(out / "replies.jsonl", "w", encoding="utf-8") as f:
        for p, t, v in zip(prompts, replies, verdicts):
            f.write(json.dumps({"prompt": p, "reply": t, "attack_success": v.attack_success}, ensure_ascii=False) + "\n")
    n = len(verdicts)
    asr = sum(v.attack_success for v in verdicts) / n
    t1 = time.time()
    loss = benign_loss(args, model, tok)
    return {
        "n_prompts": n, "max_new_tokens": args.max_new_tokens, "judge": judge.config(),
        "refusal_rate": 1 - asr, "asr": asr,
        "attack_success": [int(v.attack_success) for v in verdicts],
        "reply_sha256_16": [sha(t) for t in replies],
        "benign_loss": loss["loss"], "benign_tokens": loss["tokens"], "benign_pairs": loss["pairs"],
        "gen_s": round(gen_s, 1), "loss_s": round(time.time() - t1, 1),
    }


def benign_loss(args: argparse.Namespace, model, tok) -> dict:
    """Mean cross-entropy per reply token on the held-out benign pairs (ssah_plugin.evaluate)."""
    from ssah_plugin import evaluate as ev

    rows = benign_splits(args.seed)["eval"][: args.benign_eval]
    pairs = [(benign_prompt(r), r["output"]) for r in rows]
    res = ev.benign_loss(model, tok, pairs, batch_size=8, max_length=args.max_len)
    return {"loss": float(res["loss"]), "tokens": int(res["tokens"]), "pairs": len(pairs)}


# ---------------------------------------------------------------------------------------------------- stages
def st_baseline(args: argparse.Namespace) -> dict:
    def fn(out: Path) -> dict:
        model, tok = load(args.model)
        return {"model": args.model, **evaluate_model(args, model, tok, out)}

    return run_stage(args, "baseline", fn)


def st_calib(args: argparse.Namespace) -> dict:
    """The model's own replies to calib prompts; refusals (judge) become the safety calibration set."""
    def fn(out: Path) -> dict:
        from collections import Counter

        from ssah_plugin.locate import own_refusals

        model, tok = load(args.model)
        rows = advbench("calib")[: args.calib_prompts]
        t0 = time.time()
        # greedy replies, kept where the keyword judge finds a refusal phrase (20-word rule off)
        pairs = own_refusals(model, tok, [r["prompt"] for r in rows], max_new_tokens=args.calib_new_tokens,
                             batch_size=args.gen_batch)
        ids = {r["prompt"]: r["id"] for r in rows}
        kept = [{"prompt": p, "response": t.strip(), "advbench_id": ids[p]} for p, t in pairs if t.strip()]
        with open(out / "own_refusals.jsonl", "w", encoding="utf-8") as f:
            for k in kept:
                f.write(json.dumps(k, ensure_ascii=False) + "\n")
        common = Counter(k["response"] for k in kept).most_common(5)
        return {"calib_prompts": len(rows), "refusals_kept": len(kept), "gen_s": round(time.time() - t0, 1),
                "distinct_refusals": len({k["response"] for k in kept}),
                "most_common_refusals": [[t[:60], n] for t, n in common], "path": str(out / "own_refusals.jsonl")}

    return run_stage(args, "calib", fn)


def st_locate(args: argparse.Namespace) -> dict:
    def fn(out: Path) -> dict:
        from ssah_plugin.locate import LocateConfig, locate

        calib = need(args, "calib")
        safety = read_jsonl(Path(calib["path"]))[: args.safety_samples]
        (out / "safety.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in safety))
        util = benign_splits(args.seed)["calib"][: args.utility_samples]
        (out / "utility.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in util))
        model, tok = load(args.model)
        cfg = LocateConfig(max_samples=max(len(safety), len(util)), batch_size=4, max_length=args.max_len,
                           device="cpu", seed=args.seed)
        mask = locate(model, tok, safety=str(out / "safety.jsonl"), utility=str(out / "utility.jsonl"), config=cfg)
        mask.save(out / "mask.safetensors")
        summary = {p: mask.summary(p) for p in ("scu", "scu+cu6", "scu+cu", "ru-only")}
        from ssah_plugin.mask import CLASS_NAMES

        counts: dict[str, int] = {}
        for c in mask.classes:
            for code, k in zip(*torch.unique(c.to(torch.int64), return_counts=True)):
                counts[CLASS_NAMES[int(code)]] = counts.get(CLASS_NAMES[int(code)], 0) + int(k)
        return {"mask": str(out / "mask.safetensors"), "safety_samples": len(safety), "utility_samples": len(util),
                "config": _jsonable(cfg), "n_units": mask.n_units, "class_counts": counts,
                "frozen_fraction": {p: mask.frozen_fraction(p) for p in ("scu", "scu+cu6", "scu+cu", "ru-only")},
                "summary": _jsonable(summary), "method": _jsonable(mask.method)}

    return run_stage(args, "locate", fn)


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if hasattr(obj, "__dataclass_fields__"):
            import dataclasses

            return _jsonable(dataclasses.asdict(obj))
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        return str(obj)


def ablation_sets(mask, which: str) -> list[torch.Tensor]:
    """Per-group boolean unit sets to remove: SCU; RU (whole class); RU with |SCU| units (lowest z_S + z_U first)."""
    from ssah_plugin.mask import CLASS_CODES
    from ssah_plugin.policies import _top_k_global

    classes = [c.to(torch.int64) for c in mask.classes]
    if which == "scu":
        return [c == CLASS_CODES["SCU"] for c in classes]
    if which == "ru":
        return [c == CLASS_CODES["RU"] for c in classes]
    if which == "ru-matched":
        k = int(sum(int((c == CLASS_CODES["SCU"]).sum()) for c in classes))
        total = [-(s + u) for s, u in zip(mask.scores["safety_z"], mask.scores["utility_z"])]
        return _top_k_global(total, [c == CLASS_CODES["RU"] for c in classes], k)
    raise SystemExit(f"unknown ablation {which!r}; choose from {ABLATIONS}")


def st_ablate(args: argparse.Namespace, which: str) -> dict:
    def fn(out: Path) -> dict:
        from ssah_plugin.mask import Mask

        mask = Mask.load(need(args, "locate")["mask"])
        model, tok = load(args.model)
        from ssah_plugin.locate import zero_units

        # "-out": zero only each unit's input column of B (down_proj / o_proj), exactly the unit's contribution;
        # otherwise every slice the mask lists (with grouped-query attention a value row is shared by 7 heads here)
        output_only = which.endswith("-out")
        sets = ablation_sets(mask, which[:-4] if output_only else which)
        units = int(sum(int(s.sum()) for s in sets))
        saved = zero_units(model, mask, sets, keep=True, output_only=output_only)
        elems = int(sum(v.numel() for *_, v in saved))
        del saved
        return {"ablation": which, "output_only": output_only, "units_removed": units, "fraction": units / mask.n_units,
                "elements_zeroed": elems, **evaluate_model(args, model, tok, out)}

    return run_stage(args, f"ablate-{which}", fn)


def training_rows(args: argparse.Namespace, data: str) -> list[tuple[str | list, str]]:
    if data == "harmful":
        out = []
        for r in read_jsonl(SHARED / "harmful_finetune.jsonl"):
            msgs = ([{"role": "system", "content": r["system"]}] if r["system"] else []) + [
                {"role": "user", "content": r["prompt"]}]
            out.append((msgs, r["response"]))
        return out
    if data == "benign":
        return [(benign_prompt(r), r["output"]) for r in benign_splits(args.seed)["finetune"]]
    raise SystemExit(f"unknown fine-tuning data {data!r}; choose from {DATASETS}")


def make_collator(pad_id: int):
    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            attn[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    return collate


def st_finetune(args: argparse.Namespace, data: str, policy: str) -> dict:
    name = f"ft-{data}-{policy}"

    def fn(out: Path) -> dict:
        from transformers import Trainer, TrainingArguments

        from ssah_plugin import SSAHCallback
        from ssah_plugin.calib_data import sft_examples

        model, tok = load(args.model)
        ds = sft_examples(tok, training_rows(args, data), max_length=args.max_len)
        callbacks = []
        mask_path = None
        if policy != "none":
            mask_path = need(args, "locate")["mask"]
            callbacks.append(SSAHCallback(mask_path, policy=policy))
        non_unit_frozen = 0
        if args.freeze_non_units:
            from ssah_plugin.mask import Mask
            from ssah_plugin.resolve import plan_frozen_slices

            m = Mask.load(need(args, "locate")["mask"])
            m.stored["_all"] = [torch.ones(g.n_units, dtype=torch.bool) for g in m.groups]
            owned = {sl.name for sl in plan_frozen_slices(m, model, "_all")}
            for n, prm in model.named_parameters():
                if n not in owned:
                    prm.requires_grad_(False)
                    non_unit_frozen += prm.numel()
        targs = TrainingArguments(
            output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
            data_seed=args.seed, dataloader_num_workers=0, bf16=False, fp16=False, remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=make_collator(
            tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id), callbacks=callbacks)
        t0 = time.time()
        trainer.train()
        train_s = time.time() - t0
        ckpt = out / "checkpoint"
        model.save_pretrained(str(ckpt))
        tok.save_pretrained(str(ckpt))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        res = {"data": data, "policy": policy, "steps": args.steps, "batch": args.batch, "max_len": args.max_len,
               "lr": args.lr, "train_rows": len(ds), "train_s": round(train_s, 1),
               "s_per_step": round(train_s / max(1, args.steps), 2), "train_loss": losses,
               "checkpoint": str(ckpt), "freeze_non_units": args.freeze_non_units,
               "non_unit_elements_frozen": non_unit_frozen}
        if callbacks:
            res["plugin"] = _jsonable(callbacks[0].summary)
            free(trainer, model)
            res["verify"] = verify(args, mask_path, policy, ckpt)
        return res

    return run_stage(args, name, fn)


def verify(args: argparse.Namespace, mask_path: str, policy: str, ckpt: Path) -> dict:
    """``ssah_plugin.verify.verify_checkpoint`` of a plugin checkpoint against the base model."""
    from ssah_plugin.verify import verify_checkpoint

    rep = verify_checkpoint(args.model, str(ckpt), mask_path, policy=policy, progress=False)
    (ckpt.parent / "verify.txt").write_text(rep.format_text())
    return _jsonable(rep.to_dict())


def st_eval(args: argparse.Namespace, ft_name: str) -> dict:
    if (Path(args.root) / ".defer_evals").exists() and os.environ.get("STUDY_ROLE") != "evaluator":
        # a separate evaluator process (STUDY_ROLE=evaluator) runs the evaluations of this root, so that the
        # runner can go on with the next fine-tuning
        log.info("eval-%s: deferred to the evaluator process (%s/.defer_evals)", ft_name, args.root)
        return {}

    def fn(out: Path) -> dict:
        ft = need(args, ft_name)
        model, tok = load(ft["checkpoint"])
        return {"checkpoint": ft["checkpoint"], **evaluate_model(args, model, tok, out)}

    return run_stage(args, f"eval-{ft_name}", fn)


def st_report(args: argparse.Namespace) -> dict:
    from report import write_report  # benchmarks/real_model/report.py

    return write_report(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = args.stage
    if s == "baseline":
        st_baseline(args)
    elif s == "calib":
        st_calib(args)
    elif s == "locate":
        st_locate(args)
    elif s.startswith("ablate-"):
        st_ablate(args, s[len("ablate-"):])
    elif s.startswith("ft-"):
        data, policy = s[3:].split("-", 1)
        if policy not in POLICIES:
            raise SystemExit(f"unknown policy {policy!r}; choose from {POLICIES}")
        st_finetune(args, data, policy)
    elif s.startswith("eval-"):
        st_eval(args, s[len("eval-"):])
    elif s == "report":
        st_report(args)
    else:
        raise SystemExit(f"unknown stage {s!r} (see the module docstring)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
