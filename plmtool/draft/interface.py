"""The drafter interface every drafting head implements, and the heads' vocabulary projection.

A drafter sits on a frozen target model. From the target's last hidden state at position t (after
the final norm, what the lm_head reads) and the token the target sampled there (t+1) it proposes
K tokens at once: head k (0-based) predicts the token at t+2+k.

    forward(hidden [B,T,H], next_tokens [B,T]) -> logits [B,T,K,V]   full sequence, causal
    step(hidden [B,n,H], next_tokens [B,n], cache) -> logits [B,K,V]  n newly accepted positions

`step` equals `forward(...)[:, -1]` on the concatenated sequence; a stateless drafter (Medusa)
keeps no cache, Amphista keeps a KV cache for its adaptation layers that only accepted tokens
advance. Building, saving and loading drafters is `drafter.py`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from plmtool.draft.config import DrafterConfig


class Drafter(nn.Module):
    """Base class: subclasses implement `features`, `heads_from_features`, `project` (and a
    cache when they are stateful)."""

    cfg: DrafterConfig
    num_heads: int
    hidden_size: int
    vocab_size: int

    # --- forward in three parts, so training can run the per-head work and the vocabulary
    # projection only on the rows it supervises ---
    def features(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> list[torch.Tensor]:
        """Per-position features [B,T,H] that the heads read (sequence-level, causal work)."""
        raise NotImplementedError

    def heads_from_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Position-wise: features [..., H] -> per-head states [..., K, H]."""
        raise NotImplementedError

    def head_states(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """[B,T,H], [B,T] -> per-head states [B,T,K,H] (before the vocabulary projection)."""
        return self.heads_from_features(self.features(hidden, next_tokens))

    def project(self, states: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """Vocabulary logits of head states: [..., K, H] -> [..., K, V], or [..., H] -> [..., V]
        for one `head`."""
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        return self.project(self.head_states(hidden, next_tokens))

    # --- incremental decoding ---
    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> Any:
        return None

    def step(self, hidden: torch.Tensor, next_tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        # Stateless default: only the last accepted position matters.
        return self.forward(hidden[:, -1:], next_tokens[:, -1:])[:, -1]

    def step_static(self, hidden: torch.Tensor, next_tokens: torch.Tensor, count: torch.Tensor, cache: Any) -> torch.Tensor:
        """`step` with fixed shapes for capture in a CUDA graph: row b of hidden [B,N,H] /
        next_tokens [B,N] holds `count[b]` (count: device long, 0-dim for one row or [B], 1..N)
        accepted positions then padding. Stateless default: the heads of each row's last valid
        position."""
        return self.forward(last_rows(hidden, count), last_rows(next_tokens, count))[:, -1]

    def crop_cache(self, cache: Any, length: int) -> None:
        return None

    def cache_rows(self, cache: Any, rows: slice) -> Any:
        """A cache over `rows` of a batched cache, sharing its memory (what a step over fewer
        sequences, or the prefill of one, works on)."""
        return cache

    def copy_cache_row(self, src: Any, src_row: int, dst: Any, dst_row: int) -> None:
        """Copy row `src_row` of cache `src` into row `dst_row` of cache `dst` (the same cache or
        another of the same shape per row)."""
        return None

    # --- bookkeeping ---
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def last_rows(x: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] -> [B, 1, ...]: row b's entry at index count[b] - 1 (count 0-dim or [B])."""
    b = x.shape[0]
    last = (count.view(-1) - 1).expand(b)
    index = last.view(b, 1, *([1] * (x.dim() - 2))).expand(b, 1, *x.shape[2:])
    return x.gather(1, index)


class VocabProjection(nn.Module):
    """K heads' vocabulary projection: one [V,H] matrix shared by all heads, or one per head."""

    def __init__(self, num_heads: int, hidden_size: int, vocab_size: int, shared: bool, frozen: bool):
        super().__init__()
        self.num_heads = num_heads
        self.shared = shared
        n = 1 if shared else num_heads
        self.weight = nn.Parameter(torch.empty(n, vocab_size, hidden_size), requires_grad=not frozen)
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def copy_from(self, lm_head_weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight.copy_(lm_head_weight.detach().to(self.weight.dtype).unsqueeze(0).expand_as(self.weight))

    def _weight(self, states: torch.Tensor) -> torch.Tensor:
        # A frozen projection under autocast would be re-cast to bf16 on every call (a [V,H]
        # copy per head per step); keep one cast copy until the weight changes.
        w = self.weight
        try:
            if w.requires_grad or not torch.is_autocast_enabled(states.device.type):
                return w
            dtype = torch.get_autocast_dtype(states.device.type)
        except (TypeError, AttributeError):  # torch < 2.4: no per-device autocast queries
            return w
        key = (dtype, w.device, w.data_ptr(), w._version)
        cached = getattr(self, "_cast", None)
        if cached is None or cached[0] != key:
            cached = (key, w.detach().to(dtype))
            self._cast = cached
        return cached[1]

    def forward(self, states: torch.Tensor, head: int | None = None) -> torch.Tensor:
        w = self._weight(states)
        if w is not self.weight:
            states = states.to(w.dtype)
        if head is not None:
            return states @ w[0 if self.shared else head].T
        if self.shared:
            return states @ w[0].T
        # [..., K, H] x [K, V, H] -> [..., K, V]
        return torch.einsum("...kh,kvh->...kv", states, w)
