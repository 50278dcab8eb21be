"""Chat data for drafter training: tokenization with assistant-token masks and self-distillation.

A conversation is rendered once through the tokenizer's chat template; a token is supervised when
it belongs to an assistant turn (the reply and its end-of-turn marker, not the generation prompt).
Assistant spans are found by rendering each prefix of the conversation: the text before the i-th
reply is `render(messages[:i], add_generation_prompt=True)`, the text through it is
`render(messages[:i+1])`. This works for any template whose prefixes render as prefixes, which
holds for Llama/Qwen/Mistral/SmolLM templates; otherwise the reply text is located directly.

Self-distillation regenerates the assistant turns with the target itself (greedy, batched), so the
heads learn the target's own distribution rather than ChatGPT's. Results are cached per chunk under
the run directory and reused on rerun.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from plmtool.errors import PlmtoolError

log = logging.getLogger("plmtool")

Conversation = list[dict[str, str]]


def _render(tokenizer, messages: Conversation, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text and the [start, end) character spans of every assistant turn."""
    full = _render(tokenizer, messages, False)
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[: i + 1], False)
        if full.startswith(through) and through.startswith(before) and len(before) >= cursor:
            # the newline a template puts after the end-of-turn marker is glue, not the reply
            start, end = len(before), len(through.rstrip("\n"))
        else:  # template renders history differently: locate the reply text itself
            start = full.find(m["content"], cursor)
            if start < 0:
                continue
            end = start + len(m["content"])
        spans.append((start, end))
        cursor = end
    return full, spans


def tokenize_conversation(tokenizer, messages: Conversation, max_len: int) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation (truncated to max_len) and the assistant mask."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise PlmtoolError("the tokenizer has no chat template; drafter training renders conversations with it")
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_len)
    ids = list(enc["input_ids"])
    mask = []
    j = 0
    for start, end in enc["offset_mapping"]:
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        mask.append(j < len(spans) and spans[j][0] <= start < spans[j][1] and end > start)
    return ids, mask


def build_examples(tokenizer, conversations: list[Conversation], max_len: int, min_assistant_tokens: int = 1) -> list[dict[str, Any]]:
    from plmtool.progress import track

    examples = []
    for conv in track(conversations, "tokenizing conversations"):
        ids, mask = tokenize_conversation(tokenizer, conv, max_len)
        # head 0 is supervised from position 2 on: count supervised tokens past the first two
        if sum(mask[2:]) < max(1, min_assistant_tokens):
            continue
        examples.append({"input_ids": torch.tensor(ids, dtype=torch.long), "mask": torch.tensor(mask, dtype=torch.bool)})
    if not examples:
        raise PlmtoolError("no training examples: no conversation has enough assistant tokens after tokenization")
    return examples


def collate(examples: list[dict[str, Any]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B,T], attention mask [B,T] and assistant mask [B,T]."""
    t = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), t), dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = e["input_ids"]
        attn[i, :n] = 1
        mask[i, :n] = e["mask"]
    return ids, attn, mask


# ----------------------------------------------------------------------------- self-distillation


def _prompts(conversations: list[Conversation], max_turns: int) -> list[list[str]]:
    """The user turns to replay per conversation (system prompts are kept in front)."""
    return [[m["content"] for m in conv if m["role"] == "user"][:max_turns] for conv in conversations]


@torch.no_grad()
def generate_replies(model, tokenizer, histories: list[Conversation], max_new_tokens: int, max_prompt_tokens: int) -> list[str]:
    """Greedy replies of the target to each history, in one left-padded batch."""
    device = next(model.parameters()).device
    texts = [_render(tokenizer, h, True) for h in histories]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=attn.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
    )
    return [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]


def self_distill(model, tokenizer, conversations: list[Conversation], cache_dir: str | Path, max_new_tokens: int = 256,
                 max_turns: int = 1, batch_size: int = 16, max_prompt_tokens: int = 512) -> list[Conversation]:
    """Conversations whose assistant turns were regenerated by `model` (greedy); cached by chunk."""
    from plmtool.io import write_text
    from plmtool.progress import track

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: list[Conversation] = []
    chunks = [conversations[i : i + batch_size] for i in range(0, len(conversations), batch_size)]
    for c, chunk in enumerate(track(chunks, "self-distillation (target regenerates replies)")):
        part = cache_dir / f"part-{c:05d}.jsonl"
        if part.is_file():
            # split on "\n" only: str.splitlines() also breaks at U+2028 and friends, which
            # json.dumps(ensure_ascii=False) leaves raw inside generated text
            out += [json.loads(line) for line in part.read_text(encoding="utf-8").split("\n") if line.strip()]
            continue
        prompts = _prompts(chunk, max_turns)
        histories: list[Conversation] = [[m for m in conv[:1] if m["role"] == "system"] for conv in chunk]
        for turn in range(max(len(p) for p in prompts)):
            active = [i for i, p in enumerate(prompts) if turn < len(p)]
            for i in active:
                histories[i].append({"role": "user", "content": prompts[i][turn]})
            replies = generate_replies(model, tokenizer, [histories[i] for i in active], max_new_tokens, max_prompt_tokens)
            for i, reply in zip(active, replies):
                histories[i].append({"role": "assistant", "content": reply})
        done = [h for h in histories if any(m["role"] == "assistant" and m["content"] for m in h)]
        write_text(part, "".join(json.dumps(h, ensure_ascii=False) + "\n" for h in done))
        out += done
    log.info("self-distillation: %d conversations regenerated by the target", len(out))
    return out
