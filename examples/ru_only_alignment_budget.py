"""Alignment budget: supervised fine-tuning of a BASE model that trains only its redundant units (policy ``ru-only``).

The paper's second use of the unit classes: redundant units (RU, lowest safety + utility importance) carry little
of what the pre-trained model knows, so an alignment SFT that updates only them pays a small "alignment tax".

    python examples/ru_only_alignment_budget.py                     # tiny random base model, seconds on a CPU
    python examples/ru_only_alignment_budget.py --model /path/to/base-model --steps 200 --out runs/ru-only

Steps: locate the units of the base model (``--mask`` to reuse a mask), then SFT on alignment data (shipped
refusals to harmful prompts + benign instruction/answer pairs) with ``SSAHCallback(mask, policy="ru-only")``.
``ru-only`` freezes every unit that is not RU; parameters that belong to no unit (embeddings, norms, ``lm_head``,
query/key projections) are frozen with ``requires_grad=False`` unless ``--train-non-units`` is given, so only the
redundant units learn. At the end the script checks, bit for bit, that every non-RU unit and every non-unit tensor
is unchanged and that RU did train, writes ``summary.json`` to ``--out`` and exits 1 if a check fails.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from _common import base_parser, load_model_and_tokenizer

from ssah_plugin import Mask, SSAHCallback
from ssah_plugin.core.plan import plan_frozen_slices
from ssah_plugin.data import shipped_data_path
from ssah_plugin.data.chat import chat_pair_ids

#: A ChatML template for base models that ship none (the tiny tokenizer and most chat models have their own).
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def alignment_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs: half refusals to harmful prompts, half benign answers (shipped data)."""
    def rows(name: str) -> list[dict]:
        with open(shipped_data_path(name), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    safety = [(r["prompt"], r["response"]) for r in rows("safety_refusals.jsonl")]
    benign = [(r["instruction"] + (("\n\n" + r["input"]) if r["input"] else ""), r["output"])
              for r in rows("benign_instructions.jsonl")]
    rng = random.Random(seed)
    pairs = rng.sample(safety, n // 2) + rng.sample(benign, n - n // 2)
    rng.shuffle(pairs)
    return pairs


class SFTData(torch.utils.data.Dataset):
    """Chat-formatted pairs with labels on the response tokens only, cut to ``max_len`` tokens."""

    def __init__(self, tokenizer, pairs: list[tuple[str, str]], max_len: int = 128):
        self.items = []
        for prompt, response in pairs:
            p, r = chat_pair_ids(tokenizer, prompt, response)
            ids, labels = (p + r)[:max_len], ([-100] * len(p) + r)[:max_len]
            if any(x != -100 for x in labels):
                self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(batch: list[dict], pad_id: int = 0) -> dict:
    width = max(len(b["input_ids"]) for b in batch)
    out = {k: torch.full((len(batch), width), v, dtype=torch.long)
           for k, v in (("input_ids", pad_id), ("labels", -100), ("attention_mask", 0))}
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(b["input_ids"])
        out["labels"][i, :n] = torch.tensor(b["labels"])
        out["attention_mask"][i, :n] = 1
    return out


@torch.no_grad()
def mean_loss(model, data: SFTData, pad_id: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), 8):
        batch = collate([data[j] for j in range(i, min(i + 8, len(data)))], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train()
    return total / max(count, 1)


def locate_mask(args, model, tokenizer) -> Mask:
    """``--mask``, or locate on 16 shipped refusals / 16 benign pairs (sequences cut to ``--max-len`` tokens)."""
    if args.mask:
        return Mask.load(args.mask)
    from ssah_plugin.locate import LocateConfig, locate

    mask = locate(model, tokenizer, safety="shipped:safety_refusals.jsonl", utility="shipped:benign_instructions.jsonl",
                  config=LocateConfig(max_samples=16, batch_size=8, max_length=args.max_len, progress=False))
    mask.save(Path(args.out) / "mask.safetensors")
    return mask


def unit_owned_params(mask: Mask, model) -> set[str]:
    """Names of the parameters that hold a slice of at least one unit."""
    every = [torch.ones(g.n_units, dtype=torch.bool) for g in mask.groups]
    mask.stored["_all"] = every
    try:
        return {s.name for s in plan_frozen_slices(mask, model, "_all")}
    finally:
        del mask.stored["_all"]


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64, help="alignment SFT pairs (half refusals, half benign)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per training sequence")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (1e-3 suits the tiny model; ~1e-5 real)")
    p.add_argument("--train-non-units", action="store_true",
                   help="also train embeddings, norms, lm_head, q/k projections (default: frozen)")
    args = p.parse_args(argv)
    policy = args.policy or "ru-only"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    from transformers import Trainer, TrainingArguments

    model, tokenizer = load_model_and_tokenizer(args.model)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mask = locate_mask(args, model, tokenizer)

    owned = unit_owned_params(mask, model)
    if not args.train_non_units:
        for name, param in model.named_parameters():
            if name not in owned:
                param.requires_grad_(False)
    base = {n: t.detach().clone() for n, t in model.named_parameters()}
    data = SFTData(tokenizer, alignment_pairs(args.samples), args.max_len)
    loss_before = mean_loss(model, data, pad_id)

    config = TrainingArguments(output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=4,
                               learning_rate=args.lr, weight_decay=0.1, max_grad_norm=1.0, logging_steps=1,
                               report_to=[], save_strategy="no", use_cpu=True, seed=0, remove_unused_columns=False)
    callback = SSAHCallback(mask, policy=policy)
    trainer = Trainer(model=model, args=config, train_dataset=data, callbacks=[callback],
                      data_collator=lambda b: collate(b, pad_id))
    trainer.train()
    loss_after = mean_loss(model, data, pad_id)

    # Check bit for bit: non-RU units unchanged, RU trained, non-unit tensors unchanged (unless trained on purpose).
    from ssah_plugin.core.mask import CLASS_CODES

    params = dict(model.named_parameters())
    ru = [c.to(torch.int64) == CLASS_CODES["RU"] for c in mask.classes]
    mask.stored["_ru"], mask.stored["_rest"] = ru, [~r for r in ru]
    try:
        def changed_units(which: str) -> int:
            return sum(int((params[s.name].index_select(s.axis, s.index) !=
                            base[s.name].index_select(s.axis, s.index)).any()) for s in
                       plan_frozen_slices(mask, model, which))
        ru_slices_changed = changed_units("_ru")
        rest_slices_changed = changed_units("_rest")
    finally:
        del mask.stored["_ru"], mask.stored["_rest"]
    non_unit_changed = sorted(n for n in params if n not in owned and not torch.equal(params[n], base[n]))
    n_ru = int(sum(int(r.sum()) for r in ru))
    summary = {
        "model": args.model, "policy": policy, "steps": args.steps, "units": mask.n_units, "ru_units": n_ru,
        "trained_fraction_of_units": n_ru / mask.n_units, "frozen_fraction": mask.frozen_fraction(policy),
        "max_drift": callback.summary["max_drift"], "ru_slices_changed": ru_slices_changed,
        "non_ru_slices_changed": rest_slices_changed, "non_unit_tensors_changed": non_unit_changed,
        "train_non_units": args.train_non_units, "loss_before": loss_before, "loss_after": loss_after,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"trained only RU: {n_ru} of {mask.n_units} units ({100 * n_ru / mask.n_units:.1f}%); "
          f"SFT loss {loss_before:.4f} -> {loss_after:.4f}; non-RU unit slices changed: {rest_slices_changed}; "
          f"RU slices changed: {ru_slices_changed}; non-unit tensors changed: {len(non_unit_changed)}")
    ok = rest_slices_changed == 0 and ru_slices_changed > 0 and (args.train_non_units or not non_unit_changed)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
