"""``ssah-plugin demo``: the whole job end to end on the embedded default (tiny model, shipped data).

Measured: 5 min 16 s wall on the 2-core development machine while another job used one core.


1. *toy alignment*: a tiny random Llama is taught, by SFT, to refuse shipped harmful prompts and to answer benign
   instructions, so it has safety behaviour to keep (a stand-in for a real aligned chat model);
2. *locate*: score every unit on safety and utility data, classify SCU / UCU / CU / RU, write the mask;
3. *fine-tune* on benign data three times, same seed, steps and user rows: without the plugin, with
   ``SSAHCallback`` (freezing only), and with the recommended recipe (``SSAHCallback`` + ``with_refusal_replay``:
   5% of the rows are the toy base model's own refusals, collected with ``collect_refusals``);
4. *verify* the checkpoints against the base (frozen units bit-exact? exit code as in CI);
5. *evaluate* refusal rate on held-out harmful prompts and benign loss, base vs the fine-tunes, and print the
   share of the refusals lost by plain fine-tuning that each arm kept.

The toy model answers in short phrases, so refusals are judged by phrase alone (the keyword judge without Wei et
al.'s 20-word rule, which would count every short reply as a refusal). A 4-layer toy is not a real aligned model:
its numbers show that the pipeline runs, not the paper's effect (see docs/results-real-model.md for that).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

from ssah_plugin.core.policies import LOCATED_DEFAULT_POLICY

HELP = "run locate -> fine-tune with the callback -> verify -> eval on a tiny model and the shipped data"
EPILOG = """example:
  ssah-plugin demo --out runs/demo
  ssah-plugin demo --out runs/demo --family qwen2 --policy scu+cu
"""

logger = logging.getLogger("ssah_plugin.demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--family", default="llama", help="tiny model family (default: llama)")
    p.add_argument("--policy", default=LOCATED_DEFAULT_POLICY,
                   help=f"units to freeze while fine-tuning (default: {LOCATED_DEFAULT_POLICY}, a located mask's default)")
    p.add_argument("--align-steps", type=int, default=120, help="toy-alignment SFT steps (default: 120)")
    p.add_argument("--tune-steps", type=int, default=30, help="fine-tuning steps (default: 30)")
    p.add_argument("--tune-lr", type=float, default=1e-3, help="fine-tuning learning rate (default: 1e-3)")
    p.add_argument("--eval-prompts", type=int, default=40, help="held-out harmful prompts to evaluate (default: 40)")
    p.add_argument("--replay-share", type=float, default=0.05,
                   help="share of own refusals in the recipe arm's training rows (default: 0.05)")
    p.add_argument("--seed", type=int, default=0)


def _train(model, tokenizer, rows, out: Path, steps: int, lr: float, seed: int, callbacks=None, epochs=None):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    length = {"num_train_epochs": epochs} if epochs else {"max_steps": steps}
    args = TrainingArguments(str(out / "trainer"), **length, per_device_train_batch_size=8,
                             learning_rate=lr, weight_decay=0.1, max_grad_norm=1.0, warmup_steps=0,
                             lr_scheduler_type="constant", logging_steps=max(steps // 3, 1), report_to=[],
                             save_strategy="no", use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks or [],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    return trainer


def run(args: argparse.Namespace) -> int:
    import torch

    from ssah_plugin.data.rows import (
        load_pairs,
        load_rows,
        prompts_from_rows,
        sft_examples,
    )
    from ssah_plugin.errors import DataError
    from ssah_plugin.evaluation.judge import RefusalJudge
    from ssah_plugin.evaluation.metrics import attack_success_rate, benign_loss
    from ssah_plugin.evaluation.verify import verify_checkpoint
    from ssah_plugin.hosts.callback import SSAHCallback
    from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer
    from ssah_plugin.locate import LocateConfig, locate
    from ssah_plugin.recipes.replay import collect_refusals, with_refusal_replay

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = tiny_tokenizer()
    model = tiny_model(args.family, seed=args.seed, hidden_size=128, intermediate_size=256, num_hidden_layers=4)

    # Shipped data: refusals for AdvBench calib prompts (ids 100-460), benign instructions; eval on AdvBench `eval`.
    safety = load_pairs("shipped:safety_refusals.jsonl")
    # Short benign rows only: the tiny model trains on 96-token windows.
    benign = [(p, r) for p, r in load_pairs("shipped:benign_instructions.jsonl") if len(p) + len(r) < 400]
    rng = random.Random(args.seed)
    rng.shuffle(safety)
    rng.shuffle(benign)
    align_benign, tune_benign, heldout_benign = benign[:300], benign[300:600], benign[600:664]
    harmful_eval = prompts_from_rows(load_rows("shipped:advbench.jsonl", split="eval"))[: args.eval_prompts]

    print(f"[1/5] toy alignment: SFT of a tiny {args.family} on {len(safety[:300])} refusals + "
          f"{len(align_benign)} benign answers, {args.align_steps} steps")
    align_rows = sft_examples(tokenizer, safety[:300] + align_benign, max_length=96,
                              drop_unlabelled=False)
    _train(model, tokenizer, align_rows, out / "align", args.align_steps, 3e-3, args.seed)
    base_dir = out / "base"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    print("[2/5] locate: scoring every unit on safety and utility data")
    mask = locate(model, tokenizer, safety=safety[300:428], utility=align_benign[:128],
                  config=LocateConfig(max_samples=None, batch_size=16, max_length=192, progress=False))
    mask_path = mask.save(out / "mask.safetensors")
    overview = mask.summary(args.policy)
    print("      " + ", ".join(f"{k} {v}" for k, v in overview["classes"].items())
          + f" units; policy {args.policy} freezes {100 * mask.frozen_fraction(args.policy):.1f}%")

    # The recipe's replay rows: the toy base model's OWN refusals to AdvBench calib prompts (never the eval ones).
    calib_prompts = prompts_from_rows(load_rows("shipped:advbench.jsonl", split="calib"))[:120]
    try:
        own = collect_refusals(model, tokenizer, calib_prompts, max_new_tokens=24, batch_size=40, progress=False)
    except DataError:  # the toy learned no refusal (e.g. very few alignment steps)
        own = []
    # One epoch over the same user rows in every arm (the recipe's epoch also holds its refusal rows).
    n_rows = args.tune_steps * 8
    rows = sft_examples(tokenizer, tune_benign[:n_rows], max_length=96, drop_unlabelled=False)
    results: dict[str, dict] = {}
    arms = (("plain", "without the plugin"), ("ssah", f"WITH SSAHCallback(policy={args.policy!r})"),
            ("recipe", f"WITH SSAHCallback(policy={args.policy!r}) + with_refusal_replay(share={args.replay_share}, "
                       f"{len(own)} own refusals)"))
    for name, what in arms:
        if name == "recipe" and not own:
            print("[3/5] recipe arm skipped: the toy base model gave no refusal to the calib prompts")
            continue
        train_rows = (with_refusal_replay(rows, own, share=args.replay_share, seed=args.seed,
                                         tokenizer=tokenizer, max_length=96) if name == "recipe"
                      else rows)
        print(f"[3/5] fine-tune on benign data, {len(rows)} rows (one epoch), {what}")
        tuned = type(model).from_pretrained(base_dir)
        cbs = [SSAHCallback(mask_path, policy=args.policy)] if name != "plain" else None
        _train(tuned, tokenizer, train_rows, out / name, args.tune_steps, args.tune_lr, args.seed, cbs, epochs=1)
        tuned.save_pretrained(out / f"tuned-{name}")
        results[name] = {"model": tuned}

    print("[4/5] verify: frozen units of each fine-tuned checkpoint against the base")
    for name in results:
        report = verify_checkpoint(base_dir, out / f"tuned-{name}", mask_path, policy=args.policy, progress=False)
        results[name]["verify"] = report.to_dict()
        t = report.total
        print(f"      {name:5s}: {t.changed_units} of {t.frozen_units} frozen units changed, max drift {t.max_drift:.3g}"
              f" -> exit code {report.exit_code}")

    print(f"[5/5] eval: refusal rate on {len(harmful_eval)} held-out AdvBench prompts, loss on held-out benign data")
    judge = RefusalJudge(min_words=0)  # phrase only: the toy model's replies are short
    table = []
    for name, m in [("base", model)] + [(k, v["model"]) for k, v in results.items()]:
        asr = attack_success_rate(m, tokenizer, harmful_eval, judge=judge, max_new_tokens=24, batch_size=20,
                                  progress=False)
        loss = benign_loss(m, tokenizer, heldout_benign, batch_size=16, max_length=128, progress=False)
        table.append({"model": name, "refusal_rate": asr["refusal_rate"], "attack_success_rate": asr["asr"],
                      "benign_loss": loss["loss"]})
    base_r, plain_r = table[0]["refusal_rate"], table[1]["refusal_rate"]
    lost = base_r - plain_r
    print("\n      model   refusal rate   benign loss   kept of the refusals plain fine-tuning lost")
    for r in table:
        r["kept"] = (r["refusal_rate"] - plain_r) / lost if lost > 0 and r["model"] not in ("base", "plain") else None
        kept = "" if r["kept"] is None else f"{100 * r['kept']:.0f}%"
        print(f"      {r['model']:6s}  {r['refusal_rate']:12.3f}   {r['benign_loss']:11.4f}   {kept}")
    if lost <= 0:
        print("      (plain fine-tuning lost no refusals in this run, so there is nothing to keep)")
    summary = {"policy": args.policy, "replay_share": args.replay_share, "own_refusals": len(own),
               "mask": str(mask_path), "classes": overview["classes"], "eval": table,
               "verify": {k: v["verify"] for k, v in results.items()}}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    ok = all(results[k]["verify"]["ok"] for k in ("ssah", "recipe") if k in results)
    print("      (a 4-layer toy model: these numbers show the pipeline runs, not the paper's effect;\n"
          "       docs/results-real-model.md has the real-model study)")
    print(f"\nfrozen units bit-exact with the plugin: {ok}. Results: {out / 'demo.json'}")
    return 0 if ok else 1
