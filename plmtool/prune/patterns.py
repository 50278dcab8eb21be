"""Sparsity patterns and the mask selection rules the reference implementations use.

Convention everywhere in plmtool.prune: a mask is a bool tensor shaped like the weight with
True = *pruned* (set to zero), as in the Wanda and SparseGPT code. "N:M" means *keep* N weights in
every group of M consecutive input columns of a row (2:4 and 4:8 both prune half). `Pattern` and
`parse_pattern` live in plmtool.prune.config beside the settings they parse.
"""

from __future__ import annotations

import torch

from plmtool.errors import PlmtoolError
from plmtool.prune.config import Pattern, parse_pattern  # noqa: F401  (parsed with the other settings)


def check_width(pattern: Pattern, in_features: int, where: str) -> None:
    if pattern.structured and in_features % pattern.m:
        raise PlmtoolError(
            f"prune.pattern={pattern.n}:{pattern.m} does not divide {where} ({in_features} input columns "
            f"is not a multiple of {pattern.m})"
        )


# --------------------------------------------------------------------------------------------
# Selection rules. `score` is "importance": low scores are pruned.


def nm_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """In every group of M consecutive columns of each row, prune the M-N lowest scores.

    Equivalent to the references' loop `for ii in range(0, cols, M): topk(score[:, ii:ii+M],
    M-N, largest=False)` (same topk per group, so ties break identically), done for all
    groups in one call.
    """
    rows, cols = score.shape
    groups = score.float().reshape(rows, cols // pattern.m, pattern.m)
    idx = torch.topk(groups, pattern.prune_per_group, dim=-1, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured, compared within each output row: prune the int(cols*s) lowest of every row
    (stable sort, as Wanda does)."""
    rows, cols = score.shape
    k = int(cols * sparsity)
    idx = torch.sort(score, dim=-1, stable=True)[1][:, :k]
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured, compared over the whole layer: prune everything at or below the value at
    position int(numel*s) of the sorted scores (the magnitude/SparseGPT rule; ties at the
    threshold are all pruned, as in the references)."""
    flat = score.flatten()
    thresh = torch.sort(flat)[0][min(int(flat.numel() * sparsity), flat.numel() - 1)]
    return score <= thresh


def magnitude_reselect(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Mask re-selected by |W| inside the pattern (N:M per group, otherwise per row so every row
    keeps its share); used by the SDS weight adjustment at every iteration."""
    score = weight.abs()
    if pattern.structured:
        return nm_mask_by_rank(score, pattern) if pattern.m <= 8 else nm_mask(score, pattern)
    return row_mask(score, pattern.sparsity)


def nm_mask_by_rank(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """The N:M mask of `nm_mask` from pairwise comparisons inside each group (M^2 elementwise
    ops) instead of a top-k over millions of length-M slices, which is far slower on a GPU.
    Ties go to the lower index (top-k leaves their order unspecified)."""
    rows, cols = score.shape
    m = pattern.m
    g = score.reshape(rows, cols // m, m)
    idx = torch.arange(m, device=score.device)
    a, b = g.unsqueeze(-1), g.unsqueeze(-2)  # [..., i, 1] and [..., 1, j]
    below = (a > b) | ((a == b) & (idx.view(m, 1) > idx.view(1, m)))  # j ranks below i
    rank = below.sum(-1)  # ascending rank of element i within its group
    return (rank < pattern.prune_per_group).reshape(rows, cols)


def verify(weight: torch.Tensor, pattern: Pattern, tol: float = 1e-6) -> str | None:
    """None if `weight` obeys the pattern, else a short description of the violation."""
    zeros = weight == 0
    if pattern.structured:
        rows, cols = weight.shape
        if cols % pattern.m:
            return f"{cols} columns not a multiple of {pattern.m}"
        per_group = zeros.reshape(rows, cols // pattern.m, pattern.m).sum(-1)
        bad = int((per_group < pattern.prune_per_group).sum())
        if bad:
            return f"{bad} groups of {pattern.m} keep more than {pattern.n} weights"
        return None
    measured = float(zeros.float().mean())
    if measured + tol < pattern.sparsity - 1.0 / weight.shape[1]:
        return f"sparsity {measured:.4f} below the target {pattern.sparsity:.4f}"
    return None
