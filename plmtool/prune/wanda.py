"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, compared within each output row.

The input norm is the square root of the running mean of squared inputs (fp32) collected by
`InputStats`; no weight update follows the mask.
"""

from __future__ import annotations

import torch

from plmtool.prune.patterns import Pattern, nm_mask, row_mask


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    return weight.abs() * torch.sqrt(sq_norm.reshape(1, -1))


def wanda_mask(weight: torch.Tensor, sq_norm: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    score = wanda_score(weight, sq_norm)
    if pattern.structured:
        return nm_mask(score, pattern)
    return row_mask(score, pattern.sparsity)


@torch.no_grad()
def prune_wanda(weight: torch.Tensor, sq_norm: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    mask = wanda_mask(weight, sq_norm, pattern)
    return weight.masked_fill(mask, 0), mask
