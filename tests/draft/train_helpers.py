"""Helpers for the drafter-training tests: learnable chat data, checkpoint and JSONL writers."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def tiny_conversations(n: int = 24, seed: int = 0) -> list[list[dict]]:
    """Chat data with learnable structure: replies spell out counting sequences."""
    g = torch.Generator().manual_seed(seed)
    convs = []
    for i in range(n):
        start = int(torch.randint(0, 5, (1,), generator=g))
        reply = " ".join(str(start + j) for j in range(12))
        convs.append([{"role": "user", "content": f"count from {start}"}, {"role": "assistant", "content": reply}])
    return convs


def save_tiny_checkpoint(path: Path, target, tokenizer) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_chat_jsonl(path: Path, conversations) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path

