"""Measured per-head rank accuracies of a drafter on the target's own text (for tree building).

`rank_acc[k][r]` = fraction of positions where head k ranks the target's actual token at t+2+k
r-th (0 = top-1). Measured teacher-forced on (prompt, target response) sequences, only at
positions whose next token belongs to the response, i.e. exactly where drafts are made.
"""

from __future__ import annotations

from typing import Sequence

import torch

from plmtool.draft.decoding.target import TargetRunner


@torch.no_grad()
def measure_rank_accuracy(runner: TargetRunner, drafter, sequences: Sequence[tuple[list[int], list[int]]],
                          ranks: int = 10) -> list[list[float]]:
    K = drafter.num_heads
    counts = torch.zeros(K, ranks + 1, dtype=torch.long)
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
        for k in range(K):
            n_valid = T - (t0 + 2 + k)
            if n_valid <= 0:
                continue
            lk = logits[:n_valid, k]
            labels = ids[t0 + 2 + k : T]
            label_logit = lk.gather(1, labels.view(-1, 1))
            rank = (lk > label_logit).sum(1).clamp(max=ranks).cpu()
            counts[k] += torch.bincount(rank, minlength=ranks + 1)
    totals = counts.sum(1, keepdim=True).clamp(min=1)
    return (counts[:, :ranks].double() / totals).tolist()
