"""Calibration data: file formats, field detection and overrides, clear errors, own refusals."""
from __future__ import annotations

import json

import pytest

from ssah_plugin.data.rows import (
    encode_pairs,
    load_pairs,
    load_rows,
    pairs_from_rows,
    prompts_from_rows,
)
from ssah_plugin.errors import DataError
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_shipped_files_autodetect_fields():
    s = load_pairs("shipped:safety_refusals.jsonl", max_samples=3)
    u = load_pairs("shipped:benign_instructions.jsonl", max_samples=200, seed=3)
    assert len(s) == 3 and all(isinstance(p, str) and isinstance(r, str) for p, r in s)
    rows = load_rows("shipped:benign_instructions.jsonl")
    with_input = next(r for r in rows if r["input"])
    (pair,) = pairs_from_rows([with_input])
    assert pair == (with_input["instruction"] + "\n\n" + with_input["input"], with_input["output"])
    assert len(u) == 200
    assert load_pairs("shipped:safety_refusals.jsonl", max_samples=3) == s  # seeded sampling is deterministic


def test_csv_parquet_json_and_overrides(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    rows = [{"q": "What is 2+2?", "a": "4"}, {"q": "Name a colour.", "a": "Blue"}]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    for name in ("d.csv", "d.parquet", "d.json"):
        assert load_pairs(tmp_path / name, prompt_field="q", response_field="a") == [("What is 2+2?", "4"),
                                                                                    ("Name a colour.", "Blue")]
    msgs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    assert pairs_from_rows(msgs) == [([{"role": "user", "content": "hi"}], "hello")]


@pytest.mark.parametrize("content,match", [
    ("", "empty"),
    ('{"prompt": "x"}\n', "no response field"),
    ('{"text": "x", "response": "y"}\n', "no prompt field"),
    ('{"prompt": "x", "response": "y"}\nnot json\n', "line 2 is not valid JSON"),
    ('[1, 2]\n', "not an object"),
])
def test_bad_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_pairs(path)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_rows(tmp_path / "x.xlsx")


def test_advbench_rows_are_prompts_only():
    rows = load_rows("shipped:advbench.jsonl")[:3]
    with pytest.raises(DataError, match="own-refusals"):
        pairs_from_rows(rows)
    assert prompts_from_rows(rows) == [r["prompt"] for r in rows]


def test_errors_never_contain_harmful_text(tmp_path):
    secret = "HARMFUL-PROMPT-TEXT-" * 3
    path = _jsonl(tmp_path / "s.jsonl", [{"prompt": secret}])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert "HARMFUL" not in str(e.value)


def test_too_long_sequence_is_a_data_error_unless_truncated():
    tok = tiny_tokenizer()
    pair = ("word " * 300, "answer " * 10)
    with pytest.raises(DataError, match="more than the model's 256 positions"):
        encode_pairs(tok, [pair], max_positions=256)
    (e,) = encode_pairs(tok, [pair], max_positions=256, max_length=64)
    assert len(e.input_ids) == 64
    assert sum(e.count) >= 10  # the response survives truncation (the prompt loses its start)


def test_own_refusals(monkeypatch):
    import ssah_plugin.evaluation.generation as gen
    from ssah_plugin.locate import LocateConfig, locate

    model, tok = tiny_model("llama"), tiny_tokenizer()
    replies = iter(["I'm sorry, but I cannot help with that.", "Sure, here is how to do it step by step.",
                    "I cannot assist with that request."])
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen["prompts"] = list(prompts)
        return [next(replies) for _ in prompts]

    monkeypatch.setattr(gen, "generate", fake_generate)
    cfg = LocateConfig(own_refusals=True, max_samples=3, max_length=96, progress=False)
    mask = locate(model, tok, safety="shipped:advbench.jsonl", config=cfg)
    assert mask.method["data"]["n_safety"] == 2  # the compliant reply was dropped
    assert len(seen["prompts"]) == 3
    advbench = {r["prompt"]: r["split"] for r in load_rows("shipped:advbench.jsonl")}
    assert all(advbench[p] == "calib" for p in seen["prompts"])  # evaluation prompts never calibrate

    monkeypatch.setattr(gen, "generate", lambda m, t, prompts, **kw: ["Sure, here it is."] * len(prompts))
    with pytest.raises(DataError, match="none of the model's 3 replies"):
        locate(model, tok, safety="shipped:advbench.jsonl", config=cfg)


def test_fit_pair_keeps_the_end_of_the_prompt_and_the_start_of_the_response():
    from ssah_plugin.data.rows import fit_pair

    p, r = list(range(10)), list(range(100, 104))
    assert fit_pair(p, r, 14) == (p, r, False)  # fits: unchanged
    assert fit_pair(p, r, 8) == (p[-6:], r[:2], True)  # the reply keeps its guaranteed quarter, the prompt its end
    assert fit_pair(p, r, 4) == (p[-3:], r[:1], True)
    assert fit_pair(p, r, 2) == (p[-1:], r[:1], True)
    assert fit_pair([], r, 3) == ([], r[:3], True)
    assert fit_pair(p, [], 3) == (p[-3:], [], True)
    # a short prompt and a long reply: the standard SFT cut, the whole request survives
    short, long_reply = list(range(5)), list(range(100, 400))
    assert fit_pair(short, long_reply, 192) == (short, long_reply[:187], True)
    # a long prompt and a long reply: the reply keeps a quarter of the length, the prompt the rest of its end
    long_prompt = list(range(300))
    assert fit_pair(long_prompt, long_reply, 192) == (long_prompt[-144:], long_reply[:48], True)
    assert fit_pair(long_prompt, [7, 8], 192) == (long_prompt[-190:], [7, 8], True)  # a short reply is kept whole
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="max_length"):
            fit_pair(p, r, bad)


def test_sft_examples_mask_prompt_and_cut_long_rows_by_the_one_rule():
    from ssah_plugin.data.chat import chat_pair_ids
    from ssah_plugin.data.rows import fit_pair, sft_examples
    from ssah_plugin.io.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    pairs = [("Add 2 and 3.", "The sum is 5."), ("x " * 200, "cut away"), ("y " * 200, "z " * 100)]
    p_ids, r_ids = chat_pair_ids(tok, *pairs[0])
    with pytest.warns(UserWarning, match="2 of 3 rows are longer than max_length=64") as caught:
        rows = sft_examples(tok, pairs, max_length=64)
    assert len([w for w in caught if "max_length" in str(w.message)]) == 1  # one warning per call
    assert len(rows) == 3
    assert rows[0]["input_ids"] == p_ids + r_ids
    assert rows[0]["labels"] == [-100] * len(p_ids) + r_ids
    assert rows[0]["attention_mask"] == [1] * len(p_ids + r_ids)
    for row, pair in zip(rows[1:], pairs[1:]):
        p, r, cut = fit_pair(*chat_pair_ids(tok, *pair), 64)
        assert cut and len(row["input_ids"]) == 64 and row["input_ids"] == p + r
        assert row["labels"] == [-100] * len(p) + r and r  # the response survives
    p1, r1 = chat_pair_ids(tok, *pairs[1])  # a short reply after a long prompt: reply whole, prompt's end
    assert rows[1]["input_ids"][-len(r1):] == r1 and rows[1]["input_ids"][:-len(r1)] == p1[-(64 - len(r1)):]
    p2, r2 = chat_pair_ids(tok, *pairs[2])  # both long: the reply keeps its first quarter of the length
    assert rows[2]["input_ids"] == p2[-48:] + r2[:16]
    assert sft_examples(tok, pairs, max_length=64, drop_unlabelled=False) == rows  # every row has a label
