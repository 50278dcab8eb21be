"""Measured per-head rank accuracies of a drafter on the target's own text (for tree building).

`marginal[k][r]` = fraction of positions where head k ranks the target's actual token at t+2+k
r-th (0 = top-1). Measured teacher-forced on (prompt, target response) sequences, only at
positions whose next token belongs to the response, i.e. exactly where drafts are made.

A tree node is accepted only if every node on its path was, so the tree builder wants the
probability of a head's rank *given that its prefix was accepted*. Medusa multiplies marginal
accuracies, i.e. assumes the heads independent; they are not (text that is predictable two tokens
ahead tends to be predictable three ahead, and Amphista's auto-embedding block couples its heads
by design). `conditional[k][r]` is head k's rank distribution over the positions where heads
0..k-1 all ranked their tokens within the measured ranks (the prefixes some tree path could have
reached). It conditions on "within the table", not on the exact ranks of a path, so it is
optimistic for paths through low ranks. Measured on SmolLM2 / MT-Bench (docs/benchmarks/draft.md,
run 8): trees from either table accept the same number of tokens per step, and the marginal
product predicts the measured length more closely, so `marginal` is the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from plmtool.draft.decoding.target import TargetRunner


@dataclass
class RankAccuracy:
    marginal: list[list[float]]  # [K][ranks]
    conditional: list[list[float]]  # [K][ranks], given the prefix heads ranked within `ranks`
    positions: list[int]  # positions counted per head (marginal)
    prefix_positions: list[int]  # positions counted per head (conditional)


def rank_tables(ranks: torch.Tensor, max_rank: int) -> RankAccuracy:
    """Rank accuracies from a [K, n] matrix of the true token's rank per head and position.

    Entries are 0..max_rank-1 for a token ranked within the table, `max_rank` for one ranked
    lower, and -1 where head k has no label at that position (past the end of the text)."""
    K = ranks.shape[0]
    marginal, conditional, positions, prefix_positions = [], [], [], []
    prefix_ok = torch.ones(ranks.shape[1], dtype=torch.bool)
    for k in range(K):
        valid = ranks[k] >= 0
        for table, count_list, mask in ((marginal, positions, valid), (conditional, prefix_positions, valid & prefix_ok)):
            counts = torch.bincount(ranks[k][mask], minlength=max_rank + 1)[:max_rank].double()
            n = int(mask.sum())
            table.append((counts / max(n, 1)).tolist())
            count_list.append(n)
        prefix_ok &= valid & (ranks[k] < max_rank)
    return RankAccuracy(marginal, conditional, positions, prefix_positions)


@torch.no_grad()
def measure_rank_accuracy(runner: TargetRunner, drafter, sequences: Sequence[tuple[list[int], list[int]]],
                          ranks: int = 10) -> RankAccuracy:
    K = drafter.num_heads
    per_sequence = []
    for prompt, response in sequences:
        seq = list(prompt) + list(response)
        T, P = len(seq), len(prompt)
        if len(response) < 2:
            continue
        runner.reset()
        _, hidden = runner.extend(seq)
        runner.reset()
        ids = torch.tensor(seq, device=hidden.device)
        # positions t = P-1 .. T-2 (next token t+1 is a response token)
        t0 = P - 1
        h = hidden[t0 : T - 1].unsqueeze(0)
        nxt = ids[t0 + 1 : T].unsqueeze(0)
        logits = drafter(h, nxt)[0].float()  # [n, K, V]
        rank = torch.full((K, logits.shape[0]), -1, dtype=torch.long)
        for k in range(K):
            n_valid = T - (t0 + 2 + k)
            if n_valid <= 0:
                continue
            lk = logits[:n_valid, k]
            labels = ids[t0 + 2 + k : T]
            label_logit = lk.gather(1, labels.view(-1, 1))
            rank[k, :n_valid] = (lk > label_logit).sum(1).clamp(max=ranks).cpu()
        per_sequence.append(rank)
    if not per_sequence:
        return rank_tables(torch.full((K, 0), -1, dtype=torch.long), ranks)
    return rank_tables(torch.cat(per_sequence, dim=1), ranks)
