"""Chat templating and tokenisation of prompts and prompt/response pairs (shared by locate, evaluation, SFT rows).

Every prompt the package shows a model goes through :func:`chat_prompt`: the tokenizer's chat template with
``add_generation_prompt=True``. :func:`chat_pair_ids` splits a formatted conversation exactly at the end of that
generation prompt, so that "response tokens" mean the same positions everywhere (locate statistics, benign loss,
SFT labels). A tokenizer without a chat template, or a template that fails on a message list, raises
:class:`~ssah_plugin.errors.DataError` naming the fix.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ssah_plugin.errors import DataError

__all__ = ["Prompt", "chat_messages", "chat_prompt", "chat_pair_ids", "prompt_ids"]

#: A prompt: the user's text, or a full list of chat messages ``[{"role": ..., "content": ...}, ...]``.
Prompt = str | Sequence[dict[str, Any]]


def chat_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, Any]]:
    """The message list of ``prompt`` (a user text, or messages copied as given), with ``system`` put first unless
    the messages already start with a system turn."""
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        msgs = [dict(m) for m in prompt]
    else:
        raise DataError(f"a prompt must be a string or a list of chat messages (dicts), got {type(prompt).__name__}")
    if system is not None and not (msgs and msgs[0].get("role") == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def chat_prompt(tokenizer, prompt: Prompt, system: str | None = None) -> str:
    """The text the model sees before answering: the chat template with ``add_generation_prompt=True``.

    Raises :class:`DataError` if the tokenizer has no chat template (a base model: evaluate a chat model, or set
    ``tokenizer.chat_template``) or if the template fails on the messages.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} has no chat template, so prompts cannot be formatted the way the "
            "model was aligned. Evaluate an instruct/chat model, or set tokenizer.chat_template before evaluating"
        )
    try:
        return tokenizer.apply_chat_template(chat_messages(prompt, system), add_generation_prompt=True,
                                             tokenize=False)
    except Exception as exc:  # jinja raises TemplateError for e.g. a system role the template rejects
        hint = " (this chat template may not accept a system message; drop --system)" if system else ""
        raise DataError(f"the chat template failed on a prompt: {type(exc).__name__}: {exc}{hint}") from None


def prompt_ids(tokenizer, prompt: Prompt, system: str | None = None) -> list[int]:
    """Token ids of :func:`chat_prompt` (no special tokens added: the template already holds them)."""
    return list(tokenizer(chat_prompt(tokenizer, prompt, system), add_special_tokens=False)["input_ids"])


def chat_pair_ids(tokenizer, prompt: Prompt, response: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the formatted prompt and of the assistant turn that follows it.

    The assistant turn is the text the chat template renders after the generation prompt for ``response``
    (content plus end-of-turn marker), with trailing whitespace that the template appends after the turn removed.
    Prompt and response are tokenised separately (no special tokens added), so the boundary is exact. Over-long
    pairs are cut by :func:`ssah_plugin.data.rows.fit_pair` (the one truncation rule).
    """
    prompt_text = chat_prompt(tokenizer, prompt, system)
    msgs = chat_messages(prompt, system) + [{"role": "assistant", "content": response}]
    try:
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as exc:
        raise DataError(f"the chat template failed on a prompt/response pair: {type(exc).__name__}: {exc}") from None
    if not full.startswith(prompt_text):
        raise DataError(
            "the chat template renders the conversation with a prefix different from the generation prompt, so the "
            "response tokens cannot be separated from the prompt; use a template whose rendering of "
            "[user, assistant] starts with its rendering of [user] + generation prompt"
        )
    resp_text = full[len(prompt_text):].rstrip()
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(resp_text, add_special_tokens=False)["input_ids"]
    return list(p_ids), list(r_ids)
