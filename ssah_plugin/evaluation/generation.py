"""Greedy, batched chat generation for evaluation (the protocol of Wei et al.: greedy, chat template).

:func:`generate` formats each prompt with the tokenizer's chat template (``add_generation_prompt=True``), pads the
batch on the LEFT (so every prompt ends right before the first new token; the tokenizer's own ``padding_side`` is
restored afterwards), decodes greedily, stops at the end-of-sequence / end-of-turn token(s), and returns only the
new text. Batched output equals unbatched output token for token (tested against a manual greedy loop).

:func:`ssah_plugin.data.chat.chat_prompt` formats the prompts (the same helper locate and the benign loss use).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ssah_plugin.core.peft_layout import loaded_peft
from ssah_plugin.data.chat import Prompt, prompt_ids
from ssah_plugin.errors import DataError
from ssah_plugin.io.models import model_device

__all__ = ["generate", "generate_ids", "generate_from_ids", "eos_token_ids"]

logger = logging.getLogger(__name__)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos and the model's ``generation_config.eos_token_id`` (may be a
    list, e.g. Llama-3's ``<|eot_id|>``)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (tokenizer.eos_token_id, gen_eos):
        if v is None:
            continue
        for i in (v if isinstance(v, (list, tuple)) else [v]):
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise DataError("neither the tokenizer nor the model's generation config defines an eos token; "
                        "set tokenizer.eos_token so generation can stop")
    return ids


def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy replies to ``prompts``, in order, as decoded text without the prompt or special tokens.

    Args:
        model: a causal LM (transformers ``generate`` API).
        tokenizer: its tokenizer, with a chat template.
        prompts: user texts, or chat-message lists.
        max_new_tokens: new tokens per reply at most (Wei et al. use 256).
        batch_size: prompts per ``generate`` call. Prompts are sorted by length to reduce padding; the output order
            is that of ``prompts``.
        system: optional system message, put before each prompt that has none.
        progress: show a progress bar over batches (labelled ``desc``).

    Decoding is pure greedy (argmax at every step): settings in the model's ``generation_config`` such as
    Qwen's ``repetition_penalty=1.05`` are ignored for the call; only its eos ids are kept. The model is put in eval
    mode for the call (its training flag is restored); its ``generation_config`` and the tokenizer's
    ``padding_side`` are restored afterwards. Without a pad token, the first eos id pads (masked out by the
    attention mask).

    Example:
        >>> replies = generate(model, tokenizer, ["How do I bake bread?"], max_new_tokens=32)  # doctest: +SKIP
    """
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       system=system, progress=progress, desc=desc)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids]


def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[int]]:
    """Like :func:`generate`, but returns the new token ids of each reply, without the stop token."""
    prompts = list(prompts)
    encoded = [prompt_ids(tokenizer, p, system) for p in prompts]
    return generate_from_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress, desc=desc)


@torch.no_grad()
def generate_from_ids(
    model,
    tokenizer,
    encoded: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generate",
) -> list[list[int]]:
    """Greedy continuations of already tokenised inputs (e.g. a chat prompt plus a pre-filled reply start).

    Same decoding as :func:`generate` (pure greedy, left padding, stop at the eos ids); returns the new token ids
    of each input, in order, without the stop token. ``desc`` labels the progress bar.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1 (got {max_new_tokens}, {batch_size})")
    encoded = [list(e) for e in encoded]
    if not encoded:
        return []
    if any(not e for e in encoded):
        raise DataError("generate_from_ids got an empty input; every input needs at least one token")
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device = model_device(model)
    was_training = model.training
    old_side = tokenizer.padding_side
    out: list[list[int]] = [[] for _ in encoded]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(encoded), desc=desc, unit="prompt", leave=False)
    from transformers import GenerationConfig

    peft = loaded_peft()  # a PEFT model's generate reads its base model's generation config
    owner = model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else model
    saved_config = getattr(owner, "generation_config", None)
    try:
        model.eval()
        tokenizer.padding_side = "left"  # the layout built below; restored in `finally`
        # Pure greedy: a fresh generation config, so that settings shipped with the model (repetition_penalty,
        # no_repeat_ngram_size, min_new_tokens, suppress_tokens, ...) cannot change the argmax choice.
        owner.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad_id,
                                                   bos_token_id=getattr(saved_config, "bos_token_id", None))
        for batch in batches:
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i]
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                attn[row, width - len(seq):] = 1
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad_id,
            )
            new = gen[:, width:].cpu()
            for row, i in enumerate(batch):
                toks = new[row].tolist()
                cut = next((k for k, t in enumerate(toks) if t in eos), len(toks))
                out[i] = toks[:cut]
            if bar is not None:
                bar.update(len(batch))
    finally:
        if saved_config is not None:
            owner.generation_config = saved_config
        tokenizer.padding_side = old_side
        model.train(was_training)
        if bar is not None:
            bar.close()
    logger.debug("generated %d replies (max_new_tokens=%d, batch_size=%d)", len(out), max_new_tokens, batch_size)
    return out
