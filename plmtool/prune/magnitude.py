"""Magnitude pruning: |W| compared over the whole layer (unstructured) or per M-group (N:M)."""

from __future__ import annotations

import torch

from plmtool.prune.patterns import Pattern, layer_mask, nm_mask


def magnitude_mask(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    score = weight.abs().float()
    if pattern.structured:
        return nm_mask(score, pattern)
    return layer_mask(score, pattern.sparsity)


@torch.no_grad()
def prune_magnitude(weight: torch.Tensor, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (pruned weight, mask) without modifying `weight`."""
    mask = magnitude_mask(weight, pattern)
    return weight.masked_fill(mask, 0), mask
