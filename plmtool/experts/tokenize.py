"""Chat samples -> token ids with labels on assistant tokens only (everything else is -100).

With a chat template, the assistant spans are found by rendering growing prefixes of the
conversation: the reply of message i starts where `template(msgs[:i], add_generation_prompt=True)`
ends and stops where `template(msgs[:i+1])` ends (so the end-of-turn token is learned too). Tokens
are mapped to characters through the fast tokenizer's offsets. Without a template (or when the
template does not render prefixes consistently) a plain `User:` / `Assistant:` format is used.

Long samples: the user side of a turn is cut to `max_prompt_len` tokens first, so that a long
instruction cannot push the whole reply out of the `max_len` window.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE = -100


def _cut(tokenizer, text: str, n: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tokenizer.decode(ids[:n])


def _render_template(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]] | None:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        end_text = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(end_text) or not end_text.startswith(start_text):
            return None
        spans.append((len(start_text), len(end_text)))
    return full, spans


def _render_plain(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    eos = tokenizer.eos_token or ""
    for m in messages:
        if m["role"] == "assistant":
            text += "Assistant: "
            start = len(text)
            text += m["content"] + eos + "\n"
            spans.append((start, len(text)))
        else:
            text += f"{m['role'].capitalize()}: {m['content']}\n"
    return text, spans


def render(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(text, character spans of the assistant replies)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            out = _render_template(tokenizer, messages)
        except Exception:  # templates that reject a prefix (e.g. must end with assistant)
            out = None
        if out is not None:
            return out
    return _render_plain(tokenizer, messages)


def encode(tokenizer, messages: list[dict[str, str]], max_len: int, max_prompt_len: int | None = None) -> dict[str, list[int]]:
    """{"input_ids", "labels"} of one conversation, at most max_len tokens."""
    if max_prompt_len:
        messages = [
            {**m, "content": _cut(tokenizer, m["content"], max_prompt_len)} if m["role"] != "assistant" else m for m in messages
        ]
    text, spans = render(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_len)
    ids = enc["input_ids"]
    labels = []
    for tok, (a, _) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= a < e for s, e in spans)
        labels.append(tok if inside else IGNORE)
    return {"input_ids": ids, "labels": labels}


def encode_prompt(tokenizer, prompt: str, max_prompt_len: int | None = None) -> list[int]:
    """Ids of a user prompt followed by the assistant header, ready for generation."""
    if max_prompt_len:
        prompt = _cut(tokenizer, prompt, max_prompt_len)
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        except Exception:
            pass
    return tokenizer(f"User: {prompt}\nAssistant: ", add_special_tokens=False)["input_ids"]


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded samples into tensors."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        L = len(b["input_ids"])
        ids[i, :L] = torch.tensor(b["input_ids"])
        labels[i, :L] = torch.tensor(b["labels"])
        mask[i, :L] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (sum of NLL over labelled tokens, number of labelled tokens), shift included."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="none")
    nll = nll.view(target.shape)
    valid = target != IGNORE
    return (nll * valid).sum(1), valid.sum(1)
