"""Tiny random drafters and the plain greedy reference for the decoding-engine tests."""

from __future__ import annotations

import torch
from torch import nn


class RandomDrafter(nn.Module):
    """A drafter following the interface: K heads read hidden + the next token's embedding.

    `stateful=True` keeps a running sum of the inputs in a cache (advanced only by `step`) so the
    engine's handling of stateful drafters (Amphista-like) is exercised too. `oracle_model` makes
    head 0 sometimes right by copying the target's lm_head, so trees get accepted paths.
    """

    def __init__(self, hidden: int, vocab: int, num_heads: int = 3, stateful: bool = False, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_heads = num_heads
        self.stateful = stateful
        self.emb = nn.Parameter(torch.randn(vocab, hidden, generator=g) * 0.5)
        self.mix = nn.Parameter(torch.randn(num_heads, hidden, hidden, generator=g) * hidden**-0.5)
        self.out = nn.Parameter(torch.randn(vocab, hidden, generator=g) * 0.5)

    def _features(self, hidden, next_tokens):
        return hidden + self.emb[next_tokens]

    def _heads(self, f):  # [B,T,H] -> [B,T,K,V]
        states = torch.einsum("bth,khg->btkg", f, self.mix)
        return states @ self.out.T

    def forward(self, hidden, next_tokens):
        f = self._features(hidden, next_tokens)
        if self.stateful:
            f = f.cumsum(1)
        return self._heads(f)

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        if not self.stateful:
            return None
        return {"sum": torch.zeros(batch_size, self.emb.shape[1], device=device, dtype=dtype), "length": 0}

    def step(self, hidden, next_tokens, cache):
        f = self._features(hidden, next_tokens)
        if self.stateful:
            f = f.cumsum(1) + cache["sum"].unsqueeze(1)
            cache["sum"] = f[:, -1]
            cache["length"] += hidden.shape[1]
        return self._heads(f[:, -1:])[:, 0]

    def crop_cache(self, cache, length):
        if cache is not None:
            cache["length"] = min(cache["length"], length)


def plain_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """Independent reference: Hugging Face forward over the whole sequence, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


class OracleDrafter(nn.Module):
    """Knows the target's greedy future and proposes it with controlled noise.

    Each head's true next token is put at rank 0 (probability 1 - p_rank1 - p_miss), at rank 1
    (p_rank1; a random token takes rank 0) or left out of the top ranks (p_miss). It tracks the
    accepted sequence through `step`, exactly as a stateful drafter would, so a wrong engine
    (feeding rejected tokens, skipping accepted ones) makes its drafts, and the acceptance, collapse.
    """

    def __init__(self, target, prompt: list[int], num_heads: int = 3, p_rank1: float = 0.2, p_miss: float = 0.1, seed: int = 0):
        super().__init__()
        self.target = target
        self.first = prompt[0]
        self.num_heads = num_heads
        self.vocab = target.config.vocab_size
        self.p_rank1, self.p_miss = p_rank1, p_miss
        self.gen = torch.Generator().manual_seed(seed)

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        return {"history": []}

    def crop_cache(self, cache, length):
        pass

    def step(self, hidden, next_tokens, cache):
        cache["history"] += next_tokens[0].tolist()
        future = plain_greedy(self.target, [self.first] + cache["history"], self.num_heads)
        logits = torch.randn(self.num_heads, self.vocab, generator=self.gen) * 0.1
        for k, tok in enumerate(future):
            u = float(torch.rand((), generator=self.gen))
            other = int(torch.randint(self.vocab, (), generator=self.gen))
            if u < self.p_miss:
                logits[k, tok] = -10.0
                logits[k, other] = 10.0
            elif u < self.p_miss + self.p_rank1 and other != tok:
                logits[k, other] = 10.0
                logits[k, tok] = 9.0
            else:
                logits[k, tok] = 10.0
        return logits.unsqueeze(0).to(hidden.dtype)


def perturbed_drafter(target, kind: str, seed: int = 0, **overrides):
    """A real plmtool drafter (3 heads) on `target` with random values added to every trainable
    weight, so the zero-initialised branches do work too."""
    from plmtool.draft.config import DrafterConfig
    from plmtool.draft.drafter import build_drafter

    drafter = build_drafter(DrafterConfig(kind=kind, num_heads=3, **overrides), target=target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return drafter.eval()

