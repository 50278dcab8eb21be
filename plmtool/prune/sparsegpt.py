"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with lazy column-block updates.

Faithful to the reference `fasterprune`: H = 2/n sum x x^T in fp32 (TF32 off), dead columns
(diag(H) == 0) get H_ii = 1 and zeroed weights, damping percdamp * mean(diag H), the upper Cholesky
factor U of H^-1, column blocks of 128, the mask chosen per block by w^2 / U_ii^2 (for N:M: every M
columns, from the weights already updated by the columns before them), OBS error propagation.

What differs is only *how* the per-column recursion is evaluated. Inside a set of columns whose mask
is fixed, the reference loop
    e_i = (w_i - q_i) / U_ii ;  W[:, i:] -= e_i U[i, i:]
has a closed form per row: the errors on the pruned set S solve e_S U_SS = W_S (U_SS is the
principal submatrix of U on S, still upper triangular), and the block's new values are
W - e U. We solve that for all rows in one batched triangular solve per group of M columns
(N:M) or per sub-block of columns (unstructured, where the mask is fixed per 128-column block),
instead of one Python-level iteration of ~10 small kernels (and a host sync) per column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from plmtool.cuda_graph import CapturedGraph, capture_checked, compare, tolerance
from plmtool.prune.patterns import Pattern
from plmtool.prune.precision import exact_fp32

log = logging.getLogger("plmtool")


@dataclass
class SparseGptResult:
    weight: torch.Tensor  # fp32, pruned and updated
    mask: torch.Tensor  # True = pruned
    error: float  # the reference's "error": sum over rows of sum_i e_i^2 / 2
    damp: float  # damping actually used (raised above percdamp when Cholesky failed)
    row_errors: torch.Tensor | None = None  # the same error per row (splits a fused run per layer)


def inverse_cholesky(H: torch.Tensor, percdamp: float, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1. On failure the damping is multiplied by 10 and
    the factorisation retried (logged); it never falls back to the identity."""
    n = H.shape[0]
    diag = torch.arange(n, device=H.device)
    damp = percdamp * torch.mean(torch.diag(H)).item()
    if not damp > 0:
        damp = percdamp
    for attempt in range(max_tries):
        Hd = H.clone()
        Hd[diag, diag] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, damp
        log.warning("sparsegpt: Cholesky failed with damping %.3g (try %d); raising damping x10", damp, attempt + 1)
        damp *= 10
    raise RuntimeError(f"sparsegpt: Hessian not positive definite even with damping {damp / 10:.3g}")


def _masked_errors_unrolled(w: torch.Tensor, U: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same errors by forward substitution over the group's columns: elementwise kernels
    only (used inside CUDA graphs, where kernel count costs nothing and batched solvers may not
    be capturable)."""
    w = w.clone()
    e = torch.zeros_like(w)
    m = mask.to(w.dtype)
    k = w.shape[1]
    for j in range(k):
        e[:, j] = w[:, j] * m[:, j] / U[j, j]
        if j + 1 < k:
            w[:, j + 1 :] -= e[:, j : j + 1] * U[j : j + 1, j + 1 :]
    return e


def _masked_errors(w: torch.Tensor, U: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row r, solve e_S U_SS = w_S on the pruned set S = mask[r] (e = 0 off S).

    Written as one batched triangular solve with A_r = M U M + (I - M), M = diag(mask[r]):
    unpruned positions become identity rows/columns, so they solve to e = w * 0 = 0.
    """
    m = mask.to(w.dtype)
    k = w.shape[1]
    A = m.unsqueeze(2) * U.unsqueeze(0) * m.unsqueeze(1)
    A = A + torch.diag_embed(1 - m)
    b = (w * m).unsqueeze(1)  # [rows, 1, k]
    return torch.linalg.solve_triangular(A, b, upper=True, left=False).squeeze(1)


@torch.no_grad()
def prune_sparsegpt(
    weight: torch.Tensor,
    H: torch.Tensor,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    subblock: int = 32,
    cuda_graphs: bool = True,
    row_groups: tuple[int, ...] | None = None,
) -> SparseGptResult:
    """Prune `weight` [rows, cols] given the Hessian `H` [cols, cols]; inputs are not modified.

    `row_groups`: `weight` is several layers that share `H` (q/k/v, gate/up) stacked along rows,
    with these row counts. SparseGPT treats rows independently given H, so one fused run equals
    separate runs, except the unstructured mask threshold, which is taken per group as it would
    be per layer. Fusing shares the inverse Cholesky factor and the column loop.

    `cuda_graphs`: on a GPU, each 128-column block's loop over its column groups (hundreds of
    small kernels whose launch cost dominates) is captured once per layer shape as a CUDA graph
    and replayed. The first replay of every shape is checked against the eager computation; any
    capture failure or mismatch switches back to eager (logged).
    """
    groups = tuple(row_groups) if row_groups else (weight.shape[0],)
    if sum(groups) != weight.shape[0]:
        raise ValueError(f"row_groups {groups} do not add up to the {weight.shape[0]} rows")
    with exact_fp32():
        return _prune(weight, H, pattern, blocksize, percdamp, subblock, cuda_graphs, groups)


def _block(W1_in: torch.Tensor, U1: torch.Tensor, d1: torch.Tensor, pattern: Pattern, subblock: int, unrolled: bool = False,
           groups: tuple[int, ...] = ()):
    """One column block: returns (new block weights, errors E1, mask). No host syncs, so the
    whole function can be captured in a CUDA graph."""
    W1 = W1_in.clone()
    E1 = torch.zeros_like(W1)
    count = W1.shape[1]
    if not pattern.structured:
        score = W1**2 / (d1.reshape(1, -1)) ** 2
        parts = []
        for part in score.split(list(groups) or [score.shape[0]], dim=0):  # one threshold per layer
            thresh = torch.sort(part.flatten())[0][int(part.numel() * pattern.sparsity)]
            parts.append(part <= thresh)
        mask1 = torch.cat(parts) if len(parts) > 1 else parts[0]
    else:
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
    # Column groups whose mask is decided together: M columns for N:M; for unstructured the mask
    # is fixed per block, so any sub-block size gives the reference's result.
    step = pattern.m if pattern.structured else subblock
    for g1 in range(0, count, step):
        g2 = min(g1 + step, count)
        wg = W1[:, g1:g2]
        if pattern.structured:
            score = wg**2 / (d1[g1:g2].reshape(1, -1)) ** 2
            idx = torch.topk(score, pattern.prune_per_group, dim=1, largest=False)[1]
            mask1[:, g1:g2].scatter_(1, idx, True)
        mg = mask1[:, g1:g2]
        Ug = U1[g1:g2, g1:g2]
        eg = (_masked_errors_unrolled if unrolled else _masked_errors)(wg, Ug, mg)
        # new values of this group (exact zeros where pruned, as the reference sets q = 0)
        W1[:, g1:g2] = (wg - eg @ Ug).masked_fill(mg, 0)
        if g2 < count:
            W1[:, g2:] -= eg @ U1[g1:g2, g2:]
        E1[:, g1:g2] = eg
    return W1, E1, mask1


class _GraphedBlock:
    """`_block` captured for one (rows, blocksize, pattern) shape; inputs are copied into static
    buffers and the graph replayed."""

    def __init__(self, W1: torch.Tensor, U1: torch.Tensor, d1: torch.Tensor, pattern: Pattern, subblock: int, groups: tuple[int, ...]):
        self.W1, self.U1, self.d1 = W1.clone(), U1.clone(), d1.clone()
        self.graph = CapturedGraph("sparsegpt column block",
                                   lambda: _block(self.W1, self.U1, self.d1, pattern, subblock, unrolled=True, groups=groups),
                                   lambda: (self.W1, self.U1, self.d1))

    def __call__(self, W1, U1, d1):
        self.W1.copy_(W1)
        self.U1.copy_(U1)
        self.d1.copy_(d1)
        return self.graph.replay()


def _check_block(graphed: _GraphedBlock, W1, U1, d1, pattern, subblock, groups) -> str | None:
    """The first replay against the eager block (the batched solve): the same mask, the weights
    within the table's tolerance."""
    got = graphed(W1, U1, d1)
    ref = _block(W1, U1, d1, pattern, subblock, groups=groups)
    if not torch.equal(got[2], ref[2]):
        return "graph replay picks another mask than eager"
    return compare([("weights", got[0], ref[0])], tolerance("eager", ref[0].dtype))[1]


_GRAPHS: dict = {}
_GRAPHS_BROKEN = False


def _run_block(W1, U1, d1, pattern, subblock, cuda_graphs, groups):
    global _GRAPHS_BROKEN
    if not (cuda_graphs and W1.is_cuda and not _GRAPHS_BROKEN):
        return _block(W1, U1, d1, pattern, subblock, groups=groups)
    key = (W1.shape, pattern, subblock, W1.device, groups)
    graphed = _GRAPHS.get(key)
    if graphed is None:
        graphed = capture_checked("sparsegpt: CUDA graph capture", "running eagerly",
                                  lambda: _GraphedBlock(W1, U1, d1, pattern, subblock, groups),
                                  check=lambda g: _check_block(g, W1, U1, d1, pattern, subblock, groups))
        if graphed is None:  # capture unsupported here: stay eager (said once)
            _GRAPHS_BROKEN = True
            return _block(W1, U1, d1, pattern, subblock, groups=groups)
        _GRAPHS[key] = graphed
    return graphed(W1, U1, d1)


def _prune(weight, H, pattern, blocksize, percdamp, subblock, cuda_graphs=True, groups=()) -> SparseGptResult:
    W = weight.detach().float().clone()
    H = H.float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damp = inverse_cholesky(H, percdamp)
    del H
    dinv = torch.diag(Hinv)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    losses = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, E1, mask1 = _run_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], dinv[i1:i2], pattern, subblock, cuda_graphs, groups)
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        losses += torch.sum(E1**2, 1) / 2
        if i2 < cols:
            W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return SparseGptResult(weight=W, mask=mask, error=float(losses.sum()), damp=damp, row_errors=losses)
