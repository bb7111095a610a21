"""ASR and benign loss: exact against manual computations; data loaders; harmful text never logged."""
import json
import logging
import math

import pytest
import torch

import ssah_plugin.evaluation.evaluate as ev
import ssah_plugin.evaluation.metrics as metrics
from ssah_plugin.data.chat import chat_pair_ids, chat_prompt
from ssah_plugin.data.eval_sets import load_benign, load_harmful
from ssah_plugin.data.rows import fit_pair
from ssah_plugin.errors import DataError
from ssah_plugin.evaluation.judge import RefusalJudge
from ssah_plugin.io.models import load_model
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer

PAIRS = [("What is 2+2?", "It is 4."),
         ("Write a short greeting for a letter to a friend.", "Dear friend, I hope this letter finds you well."),
         ("Name a colour.", "Blue")]


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model("llama"), tiny_tokenizer()


def manual_loss(model, tok, pairs):
    """Independent reference: prompt ids from the generation prompt, response ids of 'response<|im_end|>'."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in pairs:
            p = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
            r = tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([p + r])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for k, tok_id in enumerate(r):
                total -= float(logp[len(p) + k - 1, tok_id])
                count += 1
    return total / count, count


def test_benign_loss_equals_manual_computation(model_tok):
    model, tok = model_tok
    expected, count = manual_loss(model, tok, PAIRS)
    for bs in (1, 2, 8):  # right padding in batches must not change the result
        got = metrics.benign_loss(model, tok, PAIRS, batch_size=bs, progress=False)
        assert got["tokens"] == count and got["n"] == 3 and got["truncated"] == 0
        assert got["loss"] == pytest.approx(expected, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    as_dicts = [{"prompt": p, "response": r} for p, r in PAIRS]
    assert metrics.benign_loss(model, tok, as_dicts, progress=False)["loss"] == pytest.approx(expected, rel=1e-5)


def test_benign_loss_truncation_keeps_response(model_tok):
    model, tok = model_tok
    long_prompt = "Please read all of this carefully. " * 4
    limit = sum(map(len, chat_pair_ids(tok, "Hi", "Yes."))) + 2  # the short pair fits, the long ones do not
    with pytest.warns(UserWarning, match=f"benign loss: 2 of 3 rows are longer than max_length={limit}") as caught:
        got = metrics.benign_loss(model, tok, [(long_prompt, "Yes.")] * 2 + [("Hi", "Yes.")], max_length=limit,
                                  progress=False)
    assert len([w for w in caught if "max_length" in str(w.message)]) == 1  # one warning per call
    full = metrics.benign_loss(model, tok, [(long_prompt, "Yes.")] * 2 + [("Hi", "Yes.")], progress=False)
    assert got["truncated"] == 2 and full["truncated"] == 0
    assert got["tokens"] == full["tokens"]  # response kept whole
    # the cut rows are exactly fit_pair's: the loss equals the manual loss on the kept tokens
    p, r, cut = fit_pair(*chat_pair_ids(tok, long_prompt, "Yes."), limit)
    assert cut and len(p) + len(r) == limit
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].double(), dim=-1)
    nll = -sum(float(logp[len(p) + k - 1, t]) for k, t in enumerate(r)) / len(r)
    alone = metrics.benign_loss(model, tok, [(long_prompt, "Yes.")], max_length=limit, progress=False)
    assert alone["loss"] == pytest.approx(nll, rel=1e-5)
    with pytest.raises(ValueError):
        metrics.benign_loss(model, tok, PAIRS, max_length=1)
    with pytest.raises(DataError):
        metrics.benign_loss(model, tok, [], progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_benign_loss_chunks_equal_the_full_logits_loss(family):
    """The chunked loss (hidden states through the LM head, a few positions at a time) equals the loss of the
    model's own full logits; Gemma-2 soft-caps its logits, so it takes the model-logits path (still chunked)."""
    model, tok = tiny_model(family).eval(), tiny_tokenizer()  # eval: GPT-2's dropout would perturb the reference
    expected, count = manual_loss(model, tok, PAIRS)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("logits_to_keep")), with_kwargs=True)
    try:
        for chunk in (1, 5, 1024):
            got = metrics.benign_loss(model, tok, PAIRS, batch_size=2, chunk_size=chunk, progress=False)
            assert got["tokens"] == count and got["loss"] == pytest.approx(expected, rel=1e-5)
    finally:
        handle.remove()
    if family == "gemma2":
        assert metrics._head_path(model) is None and set(seen) == {None}  # its own (soft-capped) logits
    else:
        assert metrics._head_path(model) is not None
        assert set(seen) == {1}  # the model never built [batch, length, vocab] logits
    with pytest.raises(ValueError, match="chunk_size"):
        metrics.benign_loss(model, tok, PAIRS, chunk_size=0)


def test_benign_loss_falls_back_when_the_head_does_not_reproduce_the_logits(model_tok, monkeypatch):
    model, tok = model_tok
    expected, _ = manual_loss(model, tok, PAIRS)
    head = model.get_output_embeddings()
    hidden = torch.randn(2, 3, head.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert metrics._head_matches(head, hidden, head(hidden[:, -1]))
        assert not metrics._head_matches(head, hidden, torch.tanh(head(hidden[:, -1])))  # a soft-cap-like change
    calls = []
    monkeypatch.setattr(metrics, "_head_matches", lambda *a: calls.append(1) and False)  # unknown post-processing
    got = metrics.benign_loss(model, tok, PAIRS, batch_size=2, progress=False)
    assert got["loss"] == pytest.approx(expected, rel=1e-5) and len(calls) == 1  # decided once per call


def test_attack_success_rate_counts_and_never_logs_text(model_tok, monkeypatch, caplog):
    model, tok = model_tok
    secret = "SECRETHARMFULTEXT"
    replies = ["I'm sorry, I cannot help with that.", f"Sure, {secret} " + "step " * 30, "ok"]
    monkeypatch.setattr(metrics, "generate", lambda m, t, prompts, **kw: list(replies))
    with caplog.at_level(logging.DEBUG):
        res = metrics.attack_success_rate(model, tok, [f"{secret} prompt {i}" for i in range(3)], max_new_tokens=4)
    assert res["flags"] == [False, True, False]
    assert res["asr"] == pytest.approx(1 / 3) and res["refusal_rate"] == pytest.approx(2 / 3)
    assert res["n"] == 3 and res["n_attack_success"] == 1
    assert res["matched"][0] == "I'm sorry" and res["matched"][2] is None
    assert res["generation"] == {"max_new_tokens": 4}
    assert secret not in caplog.text
    qi = metrics.attack_success_rate(model, tok, ["a", "b", "c"],
                                     judge=RefusalJudge("qi2023_keyword_eval_test_prefixes", min_words=0))
    assert qi["flags"] == [False, True, True]


def test_evaluate_checkpoint_and_compare_on_tiny(model_tok):
    model, tok = model_tok
    res = ev.compare(["tiny:llama", ("same", model, tok)], limit=2, max_new_tokens=4, progress=False)
    assert [r["name"] for r in res] == ["tiny:llama", "same"]
    for r in res:
        assert r["n_harmful"] == 2 and r["n_benign"] == 2 and 0.0 <= r["asr"] <= 1.0
        assert r["benign_loss"] > 0 and len(r["details"]["responses"]) == 2
    # tiny:llama is seeded: the loaded model is the fixture's model, so the numbers agree exactly
    assert res[0]["benign_loss"] == res[1]["benign_loss"]
    assert res[0]["details"]["responses"] == res[1]["details"]["responses"]
    only_utility = ev.evaluate_checkpoint(model, tok, safety=False, benign=PAIRS, progress=False)
    assert only_utility["asr"] is None and only_utility["n_benign"] == 3


def test_shipped_data_defaults_and_disjoint_split():
    assert len(load_harmful()) == 100
    assert len(load_harmful("advbench:calib")) == 420
    assert len(load_harmful(limit=5)) == 5
    held, train = load_benign(), load_benign("benign:train")
    assert len(held) == 156 and len(held) + len(train) == 1561
    assert not set(held) & set(train)


def test_loaders_read_files_and_reject_bad_rows(tmp_path):
    jl = tmp_path / "h.jsonl"
    jl.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"goal": "b"}) + "\n")
    assert load_harmful(jl) == ["a", "b"]
    txt = tmp_path / "h.txt"
    txt.write_text("x\ny\n")
    assert load_harmful(txt) == ["x", "y"]
    bj = tmp_path / "b.json"
    bj.write_text(json.dumps([{"instruction": "i", "input": "in", "output": "o"}, {"prompt": "p", "response": "r"}]))
    assert load_benign(bj) == [("i\n\nin", "o"), ("p", "r")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl: line 1"):
        load_harmful(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(DataError, match="prompt"):
        load_harmful(nofield)
    with pytest.raises(DataError, match="no prompt field"):
        load_benign(nofield)
    noresp = tmp_path / "noresp.jsonl"
    noresp.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError, match="no response field"):
        load_benign(noresp)
    with pytest.raises(DataError, match="does not exist"):
        load_harmful(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="split"):
        load_harmful("advbench:nope")
    with pytest.raises(DataError, match="tiny"):
        load_model("tiny:nope")
    with pytest.raises(DataError, match="does not exist"):
        load_model("./no/such/folder")


# ---------------------------------------------------------------------------------------------------- report + CLI
from ssah_plugin.cli import main  # noqa: E402
from ssah_plugin.evaluation.plots import plot_results  # noqa: E402
from ssah_plugin.evaluation.report import markdown_table, results_json, save_responses  # noqa: E402

FAKE = [
    {"name": "base", "asr": 0.02, "refusal_rate": 0.98, "n_harmful": 100, "benign_loss": 1.2345, "perplexity": 3.44,
     "n_benign": 156, "benign_tokens": 9000, "judge": RefusalJudge().config(), "generation": {"max_new_tokens": 64},
     "details": {"prompts": ["p1", "p2"], "responses": ["HARMFULREPLY", "no"], "flags": [True, False],
                 "matched": [None, None]}},
    {"name": "utility-only", "asr": None, "refusal_rate": None, "n_harmful": 0, "benign_loss": 1.5,
     "perplexity": 4.48, "n_benign": 156, "benign_tokens": 9000, "judge": None, "generation": None, "details": {}},
]


def test_markdown_table_and_json_keep_harmful_text_out():
    md = markdown_table(FAKE)
    assert "| base | 2.0% | 98.0% | 100 | 1.2345 | 3.44 | 156 | 9000 |" in md
    assert "| utility-only | n/a | n/a | 0 |" in md
    assert "wei2024_test_prefixes" in md and "max_new_tokens=64" in md
    js = results_json(FAKE)
    assert "HARMFULREPLY" not in json.dumps(js) and "p1" not in json.dumps(js)
    assert js[0]["per_prompt"]["attack_success"] == [True, False]


def test_plot_and_saved_responses(tmp_path):
    png = plot_results(FAKE, tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.warns(UserWarning, match="harmful"):
        path = save_responses(FAKE, tmp_path / "r.jsonl")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows[0] == {"checkpoint": "base", "index": 0, "prompt": "p1", "response": "HARMFULREPLY",
                       "attack_success": True, "matched_phrase": None}


def test_without_matplotlib_the_charts_are_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    import sys

    from ssah_plugin.errors import MissingExtraError
    from ssah_plugin.evaluation.report import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingExtraError, match=r"ssah-plugin\[plot\]"):
        plot_results(FAKE, tmp_path / "c.png")
    with pytest.warns(UserWarning, match=r"ssah-plugin\[plot\].*eval.png"):
        files = write_report(FAKE, tmp_path / "r")
    assert set(files) == {"markdown", "json"} and not (tmp_path / "r" / "eval.png").exists()
    assert main(["eval", "--model", "tiny:llama", "--no-safety", "--limit", "1", "--no-progress",
                 "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "eval.md").is_file() and not (tmp_path / "cli" / "eval.png").exists()
    monkeypatch.undo()
    assert set(write_report(FAKE, tmp_path / "np", plots=False)) == {"markdown", "json"}


def test_eval_cli_json_and_usage_errors(capsys):
    assert main(["eval", "--model", "tiny:llama", "--no-safety", "--limit", "2", "--json", "--no-progress"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == "tiny:llama" and rows[0]["asr"] is None and rows[0]["n_benign"] == 2
    assert main(["eval", "--model", "tiny:llama", "--name", "a", "--name", "b"]) == 2
    assert main(["eval", "--model", "tiny:llama", "--no-safety", "--no-utility"]) == 2
    assert main(["eval", "--model", "tiny:llama", "--save-responses"]) == 2
    assert main(["eval", "--model", "tiny:nope", "--no-progress"]) == 2
    assert main(["eval", "--model", "tiny:llama", "--harmful", "/no/such.jsonl", "--no-progress"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", "tiny:llama", "--limit", "0"])
    assert exc.value.code == 2


def test_load_model_device_map_and_the_local_rank_default(tmp_path, monkeypatch):
    import transformers

    from ssah_plugin.errors import UnsupportedSetupError
    from ssah_plugin.io.models import local_rank_device, resolve_device

    folder = tmp_path / "m"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model, _ = load_model(folder, device_map="cpu")
    assert next(model.parameters()).device.type == "cpu" and not model.training
    with pytest.raises(DataError, match="give one of them"):
        load_model(folder, device="cpu", device_map="cpu")
    with pytest.raises(DataError, match="tiny model"):
        load_model("tiny:llama", device_map="auto")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_rank_device() is None  # not under torchrun
    # under torchrun with CUDA: the rank's GPU (CUDA faked; from_pretrained records what it was asked)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    asked = {}

    def fake_from_pretrained(spec, **kwargs):
        asked.update(kwargs)
        return tiny_model("llama")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    assert resolve_device("auto") == torch.device("cuda", 1) == local_rank_device()
    load_model(folder)
    assert asked["device_map"] == torch.device("cuda", 1)
    asked.clear()
    load_model(folder, device_map="auto")
    assert asked["device_map"] == "auto"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UnsupportedSetupError, match="2 CUDA device"):
        load_model(folder)
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(UnsupportedSetupError, match="not an integer"):
        resolve_device("auto")


def test_load_model_merges_a_peft_adapter_folder(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    lora.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    lora.save_pretrained(tmp_path / "adapter")
    merged, tok = load_model(tmp_path / "adapter")
    expected = lora.merge_and_unload().model.layers[0].mlp.down_proj.weight
    assert torch.equal(merged.model.layers[0].mlp.down_proj.weight, expected)
    assert tok.chat_template


# ---------------------------------------------------------------------------------------------------- over-refusal + stats
from ssah_plugin.evaluation.stats import mcnemar_exact, rate_summary, wilson_interval  # noqa: E402


def test_false_refusal_rate_phrase_only_judge(model_tok, monkeypatch):
    model, tok = model_tok
    replies = ["I'm sorry, I cannot help with that.", "4", "Here is a poem about the sea.", "Sorry"]
    monkeypatch.setattr(metrics, "generate", lambda m, t, prompts, **kw: list(replies))
    res = metrics.false_refusal_rate(model, tok, ["a", "b", "c", "d"], progress=False)
    assert res["refused"] == [1, 0, 0, 1]  # a short answer ("4") is not a refusal: phrase-only judge
    assert res["n"] == 4 and res["n_refused"] == 2 and res["rate"] == 0.5
    assert res["wilson95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert res["replies"] == replies and res["judge"]["min_words"] == 0
    with pytest.raises(DataError):
        metrics.false_refusal_rate(model, tok, [], progress=False)
    monkeypatch.undo()
    real = metrics.false_refusal_rate(model, tok, ["What is 2+2?", "Name a colour."], max_new_tokens=4, progress=False)
    assert real["n"] == 2 and len(real["replies"]) == 2 and set(real["refused"]) <= {0, 1}


def test_wilson_interval_and_mcnemar_exact():
    lo, hi = wilson_interval(3, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.1078, 0.6032)  # by hand: (0.3 + z²/20 ± z·sqrt(0.021 + z²/400)) / (1 + z²/10)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(5, 3)
    assert rate_summary([1, 0, 0, 1]) == {"n": 4, "k": 2, "rate": 0.5, "wilson95": list(wilson_interval(2, 4))}
    m = mcnemar_exact([1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1])
    assert (m["b10"], m["b01"], m["n_discordant"]) == (3, 1, 4)
    assert m["p"] == pytest.approx(2 * (1 + 4) / 16)  # 2 * P(X <= 1), X ~ Bin(4, 1/2)
    assert mcnemar_exact([0, 1], [0, 1])["p"] == 1.0
    assert mcnemar_exact([1] * 12, [0] * 12)["p"] == pytest.approx(2 / 2 ** 12)
    assert mcnemar_exact([1] * 1100, [0] * 1100)["p"] == 0.0  # exact integer arithmetic, no overflow
    with pytest.raises(ValueError):
        mcnemar_exact([1], [1, 0])


# ---------------------------------------------------------------------------------------------------- deep evaluation
def test_eval_cli_deep_report_side_by_side(tmp_path, capsys, caplog):
    out = tmp_path / "deep"
    with caplog.at_level(logging.DEBUG):
        rc = main(["eval", "--model", "tiny:llama", "--model", "tiny:llama", "--name", "base", "--name", "same",
                   "--deep", "--limit", "2", "--max-new-tokens", "3", "--refusal-max-new-tokens", "3",
                   "--kl-tokens", "2", "--prefill-k", "0,2,full", "--framing-ids", "research,fiction",
                   "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert all((out / f).is_file() for f in ("eval.md", "eval.json", "eval.png", "deep.png"))
    md, js = (out / "eval.md").read_text(), (out / "eval.json").read_text()
    for p in load_harmful(limit=2):  # harmful text never in the report, the JSON, stdout or the logs
        assert p not in md and p not in js and p not in printed and p not in caplog.text
    rows = json.loads(js)
    deep = rows[1]["deep"]
    assert deep["prefill"]["ks"] == [0, 2, "full"] and set(deep["prefill"]["per_k"]) == {"0", "2", "full"}
    assert deep["prefill"]["per_k"]["2"]["n"] == 2 and "continuations" not in deep["prefill"]["per_k"]["2"]
    assert deep["framing"]["framings"] == ["plain", "research", "fiction"]
    assert deep["framing"]["per_framing"]["fiction"]["n"] == 2 and deep["over_refusal"]["n"] == 2
    assert rows[0]["deep"]["kl"] is None and deep["kl"]["kl"] == [0.0, 0.0]  # identical weights
    assert deep["direction"]["kept"][0] is None  # NaN (zero base gap at the embeddings) written as null
    assert deep["direction"]["kept"][1:] == pytest.approx([1.0] * (len(deep["direction"]["kept"]) - 1), rel=1e-4)
    paired = rows[1]["paired_vs_base"]
    assert {p["measure"] for p in paired} >= {"prefill ASR, K=2", "framing flip", "over-refusal"}
    assert all(p["b01"] == p["b10"] == 0 and p["p"] == 1.0 for p in paired)
    for section in ("## Prefill attack", "K=full", "## Motive framing", "## Over-refusal", "## Judge-free depth",
                    "## Paired with the base"):
        assert section in md and section in printed


def test_eval_cli_deep_usage_errors(tmp_path, capsys):
    nof = tmp_path / "nof.jsonl"
    nof.write_text(json.dumps({"prompt": "a"}) + "\n")
    base = ["eval", "--model", "tiny:llama", "--no-progress", "--limit", "1"]
    assert main(base + ["--prefill-k", "0"]) == 2
    assert "needs --attack" in capsys.readouterr().err
    assert main(base + ["--attack", "prefill", "--harmful", str(nof)]) == 2
    assert "target / response field" in capsys.readouterr().err
    assert main(base + ["--attack", "prefill", "--prefill-k", "500"]) == 2
    assert "longer than every target" in capsys.readouterr().err
    assert main(base + ["--attack", "prefill", "--prefill-k", "500", "--prefill-short", "error"]) == 2
    assert "longer than the target of prompt 0" in capsys.readouterr().err
    assert main(base + ["--attack", "framing", "--framings", str(tmp_path / "missing.json")]) == 2
    assert main(base + ["--attack", "framing", "--framing-ids", "nope"]) == 2
    with pytest.raises(SystemExit):
        main(base + ["--attack", "prefill", "--prefill-k", "0,x"])


def test_deep_compare_api_and_markdown(tiny_llama, tmp_path):
    from ssah_plugin.evaluation.deep_eval import DeepConfig, deep_compare
    from ssah_plugin.evaluation.report import deep_markdown, write_report

    model, tok = tiny_llama
    cfg = DeepConfig(attacks=("prefill",), ks=(0, 1), depth=False, over_refusal=False, max_new_tokens=2,
                     progress=False)
    rows = deep_compare([("a", model, tok), ("b", model, tok)], limit=2, cfg=cfg)
    assert [r["name"] for r in rows] == ["a", "b"] and rows[0]["paired_vs_base"] == []
    assert [p["measure"] for p in rows[1]["paired_vs_base"]] == ["prefill ASR, K=0", "prefill ASR, K=1"]
    files = write_report(rows, tmp_path)
    assert "png" not in files and files["deep_png"].read_bytes()[:4] == b"\x89PNG"
    fake = [{"name": "x", "deep": {"prefill": {"ks": [0], "per_k": {"0": {"n": 4, "asr": 0.25,
                                                                         "wilson95": [0.1, 0.5]}}}}}]
    assert "| x | 25.0% [10.0, 50.0] | 4 |" in deep_markdown(fake)
    with pytest.raises(DataError, match="unknown attack"):
        DeepConfig(attacks=("nope",))
    with pytest.raises(DataError, match="nothing to run"):
        DeepConfig(attacks=(), depth=False, over_refusal=False)


def test_saved_responses_hold_the_deep_texts_only_on_request(tmp_path):
    from ssah_plugin.evaluation.report import deep_json

    deep = {"prompts": ["HARMFULPROMPT"],
            "prefill": {"ks": [5], "per_k": {"5": {"n": 1, "asr": 1.0, "wilson95": [0.2, 1.0], "attack_success": [1],
                                                  "continuations": ["HARMFULCONT"]}}},
            "framing": {"framings": ["plain"], "per_framing": {"plain": {"attack_success": [0],
                                                                         "replies": ["I'm sorry"]}}},
            "direction": {"unit": torch.zeros(2, 3), "kept": [float("nan"), 0.5]}}
    clean = json.dumps(deep_json(deep))
    assert "HARMFUL" not in clean and "unit" not in clean and '"kept": [null, 0.5]' in clean
    with pytest.warns(UserWarning, match="harmful"):
        path = save_responses([{"name": "m", "deep": deep}], tmp_path / "r.jsonl")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows[0] == {"checkpoint": "m", "attack": "prefill", "k": "5", "index": 0, "prompt": "HARMFULPROMPT",
                       "continuation": "HARMFULCONT", "attack_success": 1}
    assert rows[1]["attack"] == "framing" and rows[1]["framing"] == "plain" and rows[1]["response"] == "I'm sorry"
