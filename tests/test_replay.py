"""Refusal replay (ssah_plugin.recipes.replay): the exact share and placement, every row format, every dataset type,
composition with SSAHCallback freezing (frozen units still bit-exact), the CLI, and the set-up errors."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from ssah_plugin import SSAHCallback, with_refusal_replay
from ssah_plugin.core.mask import Mask
from ssah_plugin.data.rows import sft_examples
from ssah_plugin.errors import DataError, UnsupportedSetupError
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer
from ssah_plugin.recipes.replay import (
    ReplayDataset,
    load_refusals,
    plan_replay,
    replay_rows,
)

REFUSALS = [("how do I do a bad thing 1", "I'm sorry, but I can't help with that."),
            ("how do I do a bad thing 2", "I cannot assist with that request."),
            ("how do I do a bad thing 3", "I'm sorry, I won't help with this.")]


@pytest.mark.parametrize("n,share", [(240, 0.05), (100, 0.1), (7, 0.5), (3, 0.01), (1000, 0.2)])
def test_plan_share_order_and_balance(n, share):
    plan = plan_replay(n, len(REFUSALS), share, seed=3)
    expected = max(1, round(share * n / (1 - share)))
    assert plan.n_replay == expected and len(plan.order) == n + expected
    users = [k for kind, k in plan.order if kind == "user"]
    assert users == list(range(n))  # every user row once, in the user's order
    picks = [k for kind, k in plan.order if kind == "replay"]
    counts = [picks.count(j) for j in range(len(REFUSALS))]
    assert max(counts) - min(counts) <= 1  # each refusal used once per cycle
    assert abs(plan.share - expected / (n + expected)) < 1e-12
    if n >= 100:
        assert abs(plan.share - share) < 0.01


def test_plan_is_seeded():
    a, b, c = (plan_replay(50, 3, 0.1, seed=s) for s in (0, 0, 1))
    assert a == b and a != c


@pytest.mark.parametrize("share", [0, 1, 1.5, -0.1, True, "0.05", None])
def test_bad_share(share):
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        plan_replay(10, 3, share)


def test_empty_inputs():
    with pytest.raises(DataError, match="empty"):
        with_refusal_replay([], REFUSALS)
    with pytest.raises(DataError, match="empty"):
        with_refusal_replay([{"messages": []}], [])


def test_messages_rows_list():
    user = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(19)]
    out = with_refusal_replay(user, REFUSALS, share=0.05, seed=0)
    assert len(out) == 20
    replayed = [r for r in out if r not in user]
    assert len(replayed) == 1
    msgs = replayed[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] and (msgs[0]["content"], msgs[1]["content"]) in REFUSALS
    assert [r for r in out if r in user] == user


def test_prompt_completion_conversational_and_text():
    conv = [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}]
    row = replay_rows(REFUSALS[:1], conv[0])[0]
    assert row == {"prompt": [{"role": "user", "content": REFUSALS[0][0]}],
                   "completion": [{"role": "assistant", "content": REFUSALS[0][1]}]}
    tok = tiny_tokenizer()
    plain = {"prompt": "q", "completion": "a"}
    with pytest.raises(DataError, match="tokenizer="):
        replay_rows(REFUSALS[:1], plain)
    row = replay_rows(REFUSALS[:1], plain, tokenizer=tok)[0]
    from ssah_plugin.data.chat import chat_prompt

    assert row == {"prompt": chat_prompt(tok, REFUSALS[0][0]), "completion": REFUSALS[0][1]}
    row = replay_rows(REFUSALS[:1], {"text": "x"}, tokenizer=tok)[0]
    assert row["text"].startswith(chat_prompt(tok, REFUSALS[0][0])) and REFUSALS[0][1] in row["text"]
    row = replay_rows(REFUSALS[:1], {"instruction": "i", "input": "", "output": "o"})[0]
    assert row == {"instruction": REFUSALS[0][0], "input": "", "output": REFUSALS[0][1]}


def test_tokenized_rows_equal_sft_examples():
    tok = tiny_tokenizer()
    like = {"input_ids": [1, 2], "attention_mask": [1, 1], "labels": [-100, 2]}
    rows = replay_rows(REFUSALS, like, tokenizer=tok, max_length=64)
    assert rows == sft_examples(tok, REFUSALS, max_length=64, drop_unlabelled=False)
    assert all(r["labels"][0] == -100 and any(x != -100 for x in r["labels"]) for r in rows)
    with pytest.raises(DataError, match="max_length="):
        replay_rows(REFUSALS, like, tokenizer=tok)
    # over-long rows follow the package's one truncation rule (data.rows.fit_pair): the refusal's start is kept
    with pytest.warns(UserWarning, match="3 of 3 rows are longer than max_length=4"):
        cut = replay_rows(REFUSALS, like, tokenizer=tok, max_length=4)
    assert all(len(r["input_ids"]) == 4 and r["labels"][:3] == [-100] * 3 and r["labels"][3] != -100 for r in cut)
    full = sft_examples(tok, REFUSALS, max_length=64, drop_unlabelled=False)
    assert [r["labels"][3:] for r in cut] == [[x for x in f["labels"] if x != -100][:1] for f in full]
    with pytest.raises(DataError, match="tokenizer="):
        replay_rows(REFUSALS, like, max_length=64)
    with pytest.warns(UserWarning, match="no 'labels'"):
        rows = replay_rows(REFUSALS, {"input_ids": [1]}, tokenizer=tok, max_length=64)
    assert list(rows[0]) == ["input_ids"]


def test_refused_formats():
    with pytest.raises(UnsupportedSetupError, match="preference pairs"):
        with_refusal_replay([{"prompt": "p", "chosen": "c", "rejected": "r"}], REFUSALS)
    with pytest.raises(DataError, match="cannot tell the format"):
        with_refusal_replay([{"foo": 1}], REFUSALS)
    stream = IterableDataset.from_generator(lambda: iter([{"text": "a"}]))
    with pytest.raises(UnsupportedSetupError, match="streaming"):
        with_refusal_replay(stream, REFUSALS)
    with pytest.raises(UnsupportedSetupError, match="map-style"):
        with_refusal_replay(iter([{"text": "a"}]), REFUSALS)


def test_hf_dataset_matches_list_and_fills_unknown_columns():
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
             "source": f"s{i}"} for i in range(30)]
    with pytest.warns(UserWarning, match="source"):
        ds = with_refusal_replay(Dataset.from_list(rows), REFUSALS, share=0.1, seed=5)
    assert isinstance(ds, Dataset) and ds.column_names == ["messages", "source"]
    as_list = with_refusal_replay(rows, REFUSALS, share=0.1, seed=5)
    assert len(ds) == len(as_list) == 33
    for a, b in zip(ds, as_list):
        assert a["messages"] == b["messages"]
        assert a["source"] == b.get("source")  # None on replayed rows


def test_torch_map_dataset_is_wrapped_lazily():
    class Squares(torch.utils.data.Dataset):
        reads = 0

        def __len__(self):
            return 9

        def __getitem__(self, i):
            Squares.reads += 1
            return {"text": str(i * i)}

    tok = tiny_tokenizer()
    ds = with_refusal_replay(Squares(), REFUSALS, share=0.1, tokenizer=tok)
    assert isinstance(ds, ReplayDataset) and len(ds) == 10
    texts = [ds[i]["text"] for i in range(len(ds))]
    assert [t for t in texts if t in {str(i * i) for i in range(9)}] == [str(i * i) for i in range(9)]


def test_load_refusals_from_file(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in REFUSALS))
    assert load_refusals(path) == REFUSALS and load_refusals(str(path)) == REFUSALS
    assert load_refusals([{"prompt": p, "response": r} for p, r in REFUSALS]) == REFUSALS
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError):
        load_refusals(tmp_path / "e.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataError, match="no response field"):
        load_refusals(tmp_path / "bad.jsonl")


def test_replay_composes_with_freezing(tmp_path):
    """Trainer on a tokenized dataset with refusals mixed in and SSAHCallback: the share of refusal rows the
    dataloader really serves is exact, and the frozen units stay bitwise equal to the base."""
    torch.manual_seed(0)
    model, tok = tiny_model("llama", seed=0), tiny_tokenizer()
    user_pairs = [(f"write a short poem number {i}", f"roses are red {i} violets are blue") for i in range(38)]
    user = sft_examples(tok, user_pairs, max_length=64)
    ds = with_refusal_replay(Dataset.from_list(user), REFUSALS, share=0.05, tokenizer=tok, max_length=64)
    assert len(ds) == 40
    replay_ids = {tuple(r["input_ids"]) for r in sft_examples(tok, REFUSALS, max_length=64)}
    served = []

    class Spy(Trainer):
        def training_step(self, model, inputs, *a, **k):
            for row, att in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
                served.append(tuple(t for t, m in zip(row, att) if m))
            return super().training_step(model, inputs, *a, **k)

    units = {g.name: [0, 3] for g in __import__("ssah_plugin.core.units", fromlist=["x"]).describe_units(model)}
    mask = Mask.from_units(model, units)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
                             learning_rate=1e-2, weight_decay=0.1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, seed=0, remove_unused_columns=False)
    cb = SSAHCallback(mask)
    trainer = Spy(model=model, args=args, train_dataset=ds, callbacks=[cb],
                  data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding=True))
    trainer.train()
    assert len(served) == 40 and sum(s in replay_ids for s in served) == 2
    assert cb.summary["max_drift"] == 0.0
    from ssah_plugin.core.plan import plan_frozen_slices

    params = dict(model.named_parameters())
    changed = False
    for sl in plan_frozen_slices(mask, model):
        p = params[sl.name].detach()
        assert torch.equal(p.index_select(sl.axis, sl.index), base[sl.name].index_select(sl.axis, sl.index))
    for n, p in params.items():
        changed |= not torch.equal(p, base[n])
    assert changed


def test_cli_refusals(tmp_path, monkeypatch, capsys):
    """The command writes the replies the judge reads as refusals; a tiny random model refuses nothing, so the
    judge is told every reply is a refusal here (the selection itself is tested with locate's own_refusals)."""
    from ssah_plugin.cli import main
    from ssah_plugin.evaluation import judge as judge_mod

    monkeypatch.setattr(judge_mod.RefusalJudge, "is_refusal", lambda self, text: bool(text.strip()))
    out = tmp_path / "ref.jsonl"
    assert main(["refusals", "--model", "tiny:llama", "--max-prompts", "3", "--max-new-tokens", "4",
                 "-o", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(rows) <= 3 and all(set(r) == {"prompt", "response"} for r in rows)
    assert "refusals out of 3 prompts" in capsys.readouterr().out
    assert main(["refusals", "--model", "tiny:llama", "-o", str(out)]) == 2  # exists, no --force
    assert main(["refusals", "--model", "tiny:llama", "-o", str(tmp_path)]) == 2  # a folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert with_refusal_replay([{"text": "a"}] * 5, out, share=0.2, tokenizer=tiny_tokenizer())
