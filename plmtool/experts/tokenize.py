"""Chat samples -> token ids with labels on assistant tokens only (everything else is -100).

The rendering and the assistant spans are plmtool.data.chat_tokens' (the same as drafter
training's): the reply and its end-of-turn marker are labelled. Long samples: the user side of a
turn is cut to `max_prompt_len` tokens first, so that a long instruction cannot push the whole
reply out of the `max_len` window.
"""

from __future__ import annotations

from typing import Any

import torch

from plmtool.data.chat_tokens import assistant_tokens, cut_tokens, render_prompt

IGNORE = -100


def encode(tokenizer, messages: list[dict[str, str]], max_len: int, max_prompt_len: int | None = None) -> dict[str, list[int]]:
    """{"input_ids", "labels"} of one conversation, at most max_len tokens."""
    ids, mask = assistant_tokens(tokenizer, messages, max_len, max_prompt_len)
    return {"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, mask)]}


def encode_prompt(tokenizer, prompt: str, max_prompt_len: int | None = None) -> list[int]:
    """Ids of a user prompt followed by the assistant header, ready for generation."""
    if max_prompt_len:
        prompt = cut_tokens(tokenizer, prompt, max_prompt_len)
    return tokenizer(render_prompt(tokenizer, [{"role": "user", "content": prompt}]), add_special_tokens=False)["input_ids"]


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
