"""Conversations as token ids with the assistant tokens marked: what chat training learns.

A conversation is rendered once, through the tokenizer's chat template (or, for a tokenizer
without one, a plain `User: ...` / `Assistant: ...` layout), and a token is supervised when it
belongs to an assistant turn: the reply and its end-of-turn marker, neither the generation prompt
before the reply nor the newline a template puts after the marker (glue that generation, which
stops at the marker, never produces).

Assistant spans are found by rendering prefixes of the conversation: the text before the i-th
reply is `render(messages[:i], add_generation_prompt=True)`, the text through it is
`render(messages[:i+1])`. This works for any template whose prefixes render as prefixes, which
holds for Llama/Qwen/Mistral/SmolLM templates; otherwise (or where a template refuses a prefix)
the reply text is located in the rendering directly.
"""

from __future__ import annotations

from plmtool.data.chat import Conversation


def _template(tokenizer, messages: Conversation, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _plain(tokenizer, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    for m in messages:
        if m["role"] == "assistant":
            text += "Assistant: "
            start = len(text)
            text += m["content"] + (tokenizer.eos_token or "")
            spans.append((start, len(text)))
            text += "\n"
        else:
            text += f"{m['role'].capitalize()}: {m['content']}\n"
    return text, spans


def _template_spans(tokenizer, messages: Conversation, full: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = _template(tokenizer, messages[:i], True) if i else ""
            through = _template(tokenizer, messages[: i + 1], False)
            prefixes = full.startswith(through) and through.startswith(before) and len(before) >= cursor
        except Exception:  # a template that refuses a prefix (e.g. one that must end with the assistant)
            prefixes = False
        if prefixes:
            start, end = len(before), len(through.rstrip("\n"))
        else:
            start = full.find(m["content"], cursor)
            if start < 0:
                continue
            end = start + len(m["content"])
        spans.append((start, end))
        cursor = end
    return spans


def render(tokenizer, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns."""
    if getattr(tokenizer, "chat_template", None):
        try:
            full = _template(tokenizer, messages, False)
        except Exception:  # a template that refuses these messages: the plain layout
            full = None
        if full is not None:
            return full, _template_spans(tokenizer, messages, full)
    return _plain(tokenizer, messages)


def render_prompt(tokenizer, messages: Conversation) -> str:
    """A conversation that ends on a user turn, with the assistant's header after it: the text
    generation continues."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return _template(tokenizer, messages, True)
        except Exception:
            pass
    return _plain(tokenizer, messages)[0] + "Assistant: "


def cut_tokens(tokenizer, text: str, n: int) -> str:
    """`text` cut to its first n tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n])


def assistant_tokens(tokenizer, messages: Conversation, max_len: int,
                     max_prompt_len: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation (at most `max_len`) and whether each is supervised.

    `max_prompt_len` first cuts every message but the replies to that many tokens, so that a long
    instruction cannot push the whole reply out of the window.
    """
    if max_prompt_len:
        messages = [m if m["role"] == "assistant" else {**m, "content": cut_tokens(tokenizer, m["content"], max_prompt_len)}
                    for m in messages]
    text, spans = render(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_len)
    mask = []
    j = 0
    for start, end in enc["offset_mapping"]:
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        mask.append(j < len(spans) and spans[j][0] <= start < spans[j][1] and end > start)
    return list(enc["input_ids"]), mask
