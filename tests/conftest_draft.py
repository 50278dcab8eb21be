"""Helpers for the draft-head tests: tiny targets, learnable chat data, checkpoint/JSONL writers.

Imported by tests/test_draft_*.py (not a pytest conftest, so it cannot clash with the shared one).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

def tiny_target(vocab_size: int, seed: int = 0, **overrides):
    """A tiny random Llama (hidden 32) built fresh, so training it never touches shared fixtures."""
    from conftest import build_tiny_llama

    return build_tiny_llama(vocab_size, seed=seed, **{"hidden_size": 32, "intermediate_size": 64, **overrides})


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


def one_thread():
    """Generator body for an autouse fixture: tiny-model tests are all small ops, where a second
    OpenMP thread only adds synchronisation (and stalls badly on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
