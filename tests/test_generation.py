"""Greedy batched generation equals a manual greedy loop token for token; padding side and mode restored."""
import pytest

from ssah_plugin.data.chat import chat_pair_ids, chat_prompt
from ssah_plugin.errors import DataError
from ssah_plugin.evaluation.generation import eos_token_ids, generate, generate_ids
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer
from ssah_plugin.testing.oracles import greedy_from_ids

PROMPTS = ["Hello there, how are you today?", "Write a poem", "What is 2+2? Explain it in detail, please.", "Hi"]
N_NEW = 12


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model("llama"), tiny_tokenizer()


def manual_greedy(model, tok, prompt, n_new, eos, system=None):
    ids = tok(chat_prompt(tok, prompt, system), add_special_tokens=False)["input_ids"]
    return greedy_from_ids(model, ids, n_new, eos)


def test_matches_manual_greedy_loop_and_batched_equals_unbatched(model_tok):
    model, tok = model_tok
    eos = eos_token_ids(model, tok)
    manual = [manual_greedy(model, tok, p, N_NEW, eos) for p in PROMPTS]
    batched = generate_ids(model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=4, progress=False)
    single = generate_ids(model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=1, progress=False)
    assert batched == manual
    assert single == manual
    assert all(len(m) > 0 for m in manual)
    texts = generate(model, tok, PROMPTS, max_new_tokens=N_NEW, batch_size=3, progress=False)
    assert texts == [tok.decode(m, skip_special_tokens=True) for m in manual]


def test_system_message_is_used(model_tok):
    model, tok = model_tok
    eos = eos_token_ids(model, tok)
    sys_msg = "You are a careful assistant."
    assert sys_msg in chat_prompt(tok, "Hi", sys_msg)
    got = generate_ids(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=2, system=sys_msg, progress=False)
    assert got == [manual_greedy(model, tok, p, 6, eos, sys_msg) for p in PROMPTS[:2]]


def test_stops_at_generation_config_eos(model_tok):
    model, tok = model_tok
    first = manual_greedy(model, tok, PROMPTS[0], 1, eos=[])[0]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [2, first]
    try:
        assert first in eos_token_ids(model, tok)
        got = generate_ids(model, tok, PROMPTS[:2], max_new_tokens=8, batch_size=2, progress=False)
    finally:
        model.generation_config.eos_token_id = old
    assert got[0] == []
    assert first not in got[1]


@pytest.mark.parametrize("side", ["right", "left"])
def test_restores_padding_side_and_training_mode(model_tok, side):
    model, tok = model_tok
    tok.padding_side = side
    model.train()
    try:
        generate(model, tok, PROMPTS[:2], max_new_tokens=2, progress=False)
        assert tok.padding_side == side
        assert model.training
    finally:
        tok.padding_side = "right"
        model.eval()


def test_chat_pair_ids_split_at_generation_prompt(model_tok):
    _, tok = model_tok
    p, r = chat_pair_ids(tok, "hi", "there")
    assert p == tok(chat_prompt(tok, "hi"), add_special_tokens=False)["input_ids"]
    assert r == tok("there<|im_end|>", add_special_tokens=False)["input_ids"]


def test_no_chat_template_is_a_clear_error(model_tok):
    model, _ = model_tok
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="chat template"):
        generate(model, tok, ["hi"], progress=False)


def test_bad_inputs(model_tok):
    model, tok = model_tok
    assert generate(model, tok, [], progress=False) == []
    with pytest.raises(ValueError):
        generate(model, tok, ["hi"], max_new_tokens=0)
    with pytest.raises(DataError):
        generate(model, tok, [42], progress=False)


def test_pure_greedy_ignores_generation_config_penalties(model_tok):
    model, tok = model_tok
    eos = eos_token_ids(model, tok)
    manual = [manual_greedy(model, tok, p, N_NEW, eos) for p in PROMPTS[:2]]
    cfg = model.generation_config
    cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.suppress_tokens = 3.0, 1, [manual[0][0]]
    try:
        got = generate_ids(model, tok, PROMPTS[:2], max_new_tokens=N_NEW, batch_size=2, progress=False)
        assert model.generation_config is cfg  # restored
        biased = model.generate(**tok([chat_prompt(tok, PROMPTS[0])], return_tensors="pt", add_special_tokens=False),
                                max_new_tokens=N_NEW, do_sample=False)
    finally:
        cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.suppress_tokens = 1.0, 0, None
    assert got == manual
    n_prompt = len(tok(chat_prompt(tok, PROMPTS[0]), add_special_tokens=False)["input_ids"])
    assert biased[0, n_prompt:].tolist()[: len(manual[0])] != manual[0]  # the penalties do change plain generate()
