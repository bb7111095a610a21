"""Tiny models and a tokenizer built in-process (no hub): the embedded default for demos, tests and examples.

``tiny_model("llama")`` returns a randomly initialised 2-layer model of that family with the real module layout
(gate/up/down, q/k/v/o, fused projections for Phi-3, Conv1D for GPT-2). ``tiny_tokenizer()`` trains a small
byte-level BPE on the shipped data and sets a chat template, so chat formatting and label masking are real.
"""
from __future__ import annotations

import functools
import json

import torch

from ssah_plugin.data import shipped_data_path

__all__ = ["tiny_config", "tiny_model", "tiny_tokenizer", "TINY_FAMILIES", "CHAT_TEMPLATE"]

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2")

#: A minimal ChatML-style template with ``{% generation %}`` markers (assistant-only loss in TRL).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(family: str = "llama", vocab_size: int = 512, **overrides):
    """A transformers config of ``family`` small enough to train in milliseconds on a CPU."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt2":
        kw = dict(vocab_size=vocab_size, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif family in ("gemma", "gemma2", "gemma3_text"):
        kw = dict(common, head_dim=16)
        if family != "gemma":
            kw.update(sliding_window=32, query_pre_attn_scalar=16)
    elif family == "phi3":
        kw = dict(common)
        kw.pop("num_key_value_heads")
        kw["num_key_value_heads"] = 4
    elif family == "qwen3":
        kw = dict(common, head_dim=16)
    else:
        kw = dict(common)
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {TINY_FAMILIES}")
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised causal LM of ``family`` (seeded, so two calls give identical weights)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.pad_token_id = cfg.pad_token_id
    return model


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    with open(shipped_data_path("benign_instructions.jsonl"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 300:
                break
            row = json.loads(line)
            texts.append(row["instruction"] + "\n" + row["output"])
    with open(shipped_data_path("safety_refusals.jsonl"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 200:
                break
            texts.append(json.loads(line)["response"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (ids: 0 pad, 1 bos, 2 eos ``<|im_end|>``) with :data:`CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
                                  pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok
