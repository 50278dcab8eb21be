"""Masks and weight updates of the one-shot pruners against direct computations."""

from __future__ import annotations

import pytest
import torch

from plmtool.errors import PlmtoolError
from plmtool.prune.magnitude import prune_magnitude
from plmtool.prune.patterns import Pattern, parse_pattern, verify
from plmtool.prune.sparsegpt import prune_sparsegpt
from plmtool.prune.stats import InputStats
from plmtool.prune.wanda import prune_wanda
from tests.conftest import build_tiny_llama

PATTERNS = [parse_pattern("2:4"), parse_pattern("4:8"), parse_pattern("unstructured", 0.5), parse_pattern("unstructured", 0.3)]


def _layer(rows=24, cols=64, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)  # continuous: no ties
    # inputs with uneven feature scales, like real activations
    X = torch.randn(tokens, cols, generator=g) * torch.rand(cols, generator=g).mul(3).add(0.1)
    return W, X


def _stats(X, chunks=4):
    st = InputStats(X.shape[1], "cpu", gram=True)
    for part in X.chunk(chunks):
        st.add(part.unsqueeze(0))
    return st


def test_parse_pattern_errors():
    assert parse_pattern("2:4") == Pattern(0.5, 2, 4)
    for bad, sp in [("4:4", None), ("5:4", None), ("0:4", None), ("unstructured", 1.0), ("unstructured", 0.0), ("unstructured", -0.2), ("abc", 0.5)]:
        with pytest.raises(PlmtoolError):
            parse_pattern(bad, sp)


def test_stats_match_direct_sums():
    W, X = _layer()
    st = _stats(X)
    n = 4  # samples
    assert torch.allclose(st.sq_norm, (X**2).sum(0) / n, rtol=1e-5)
    assert torch.allclose(st.gram, 2 / n * X.t() @ X, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_magnitude_mask_direct(pattern):
    W, _ = _layer()
    pruned, mask = prune_magnitude(W, pattern)
    A = W.abs()
    if pattern.structured:
        expected = torch.zeros_like(mask)
        for r in range(W.shape[0]):
            for g in range(0, W.shape[1], pattern.m):
                order = sorted(range(g, g + pattern.m), key=lambda j: A[r, j].item())
                for j in order[: pattern.m - pattern.n]:
                    expected[r, j] = True
    else:
        k = int(W.numel() * pattern.sparsity)
        cutoff = sorted(A.flatten().tolist())[k]
        expected = A <= cutoff
    assert torch.equal(mask, expected)
    assert torch.equal(pruned == 0, expected)
    assert verify(pruned, pattern) is None


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_wanda_mask_direct(pattern):
    W, X = _layer()
    st = _stats(X)
    pruned, mask = prune_wanda(W, st.sq_norm, pattern)
    score = W.abs() * X.norm(dim=0)  # ranking is invariant to the 1/n scale
    expected = torch.zeros_like(mask)
    for r in range(W.shape[0]):
        if pattern.structured:
            for g in range(0, W.shape[1], pattern.m):
                order = sorted(range(g, g + pattern.m), key=lambda j: score[r, j].item())
                expected[r, order[: pattern.m - pattern.n]] = True
        else:
            order = sorted(range(W.shape[1]), key=lambda j: score[r, j].item())
            expected[r, order[: int(W.shape[1] * pattern.sparsity)]] = True
    assert torch.equal(mask, expected)
    assert torch.equal(pruned, W.masked_fill(expected, 0))
    assert verify(pruned, pattern) is None


def reference_sparsegpt(W, H, pattern, blocksize=128, percdamp=0.01):
    """The published per-column loop (fasterprune), transcribed for comparison."""
    W = W.clone().float()
    H = H.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(cols)
    H[idx, idx] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    prunen, prunem = (pattern.m - pattern.n, pattern.m) if pattern.structured else (0, 0)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * pattern.sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : i + prunem] ** 2 / (torch.diag(Hinv1)[i : i + prunem].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("cols,blocksize", [(64, 128), (256, 128), (96, 32)])
def test_sparsegpt_matches_reference_loop(pattern, cols, blocksize):
    W, X = _layer(rows=16, cols=cols, tokens=4 * cols, seed=cols)
    H = _stats(X).gram
    H[:, 3] = 0
    H[3, :] = 0  # a dead column
    ref = reference_sparsegpt(W, H, pattern, blocksize=blocksize)
    out = prune_sparsegpt(W, H, pattern, blocksize=blocksize, subblock=8)
    # same masks; values equal up to fp32 rounding order
    assert torch.equal(out.mask, ref == 0)
    assert torch.allclose(out.weight, ref, atol=1e-4, rtol=1e-3)
    assert verify(out.weight, pattern) is None
    # the graph-friendly forward substitution (used inside CUDA graphs) gives the same block
    from plmtool.prune.sparsegpt import _block

    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + torch.eye(cols) * 0.01 * H.diag().mean())), upper=True)
    a = _block(W[:, :32], U[:32, :32], U.diag()[:32], pattern, 8, unrolled=False)
    b = _block(W[:, :32], U[:32, :32], U.diag()[:32], pattern, 8, unrolled=True)
    assert torch.equal(a[2], b[2]) and torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


@pytest.mark.parametrize("pattern", PATTERNS[:3], ids=str)
def test_sparsegpt_reconstructs_better_than_magnitude(pattern):
    W, X = _layer(rows=32, cols=128, tokens=1024)
    H = _stats(X).gram
    sg = prune_sparsegpt(W, H, pattern).weight
    mag, _ = prune_magnitude(W, pattern)
    wa, _ = prune_wanda(W, _stats(X).sq_norm, pattern)

    def err(Wp):
        return float(((W - Wp) @ X.t()).pow(2).sum())

    assert verify(sg, pattern) is None
    assert err(sg) < 0.8 * err(mag)
    assert err(wa) < err(mag)


def test_sparsegpt_damping_retry_on_indefinite_hessian(caplog):
    W, X = _layer(rows=8, cols=32)
    H = -torch.eye(32)  # indefinite: the first damping cannot fix it
    out = prune_sparsegpt(W, H, parse_pattern("2:4"), percdamp=0.01)
    assert out.damp > 1.0
    assert "Cholesky failed" in caplog.text
    assert verify(out.weight, parse_pattern("2:4")) is None


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_sparsegpt_fused_rows_equal_separate_layers(pattern):
    """q/k/v (or gate/up) share one Hessian: pruning them stacked equals pruning each alone,
    including the unstructured threshold, which stays per layer."""
    W, X = _layer(rows=40, cols=64, tokens=512, seed=3)
    W[24:] *= 3.0  # layers of different scale: a shared unstructured threshold would differ
    H = _stats(X).gram
    parts = (16, 8, 16)
    fused = prune_sparsegpt(W, H, pattern, blocksize=32, subblock=8, row_groups=parts)
    for w, got, err in zip(W.split(parts), fused.weight.split(parts), fused.row_errors.split(parts)):
        alone = prune_sparsegpt(w, H, pattern, blocksize=32, subblock=8)
        assert torch.equal(got == 0, alone.mask)
        assert torch.allclose(got, alone.weight, atol=1e-5, rtol=1e-4)
        assert float(err.sum()) == pytest.approx(alone.error, rel=1e-4)


def test_oneshot_sparsegpt_fusion_matches_unfused():
    import copy
    from dataclasses import replace

    from plmtool.prune.config import PruneConfig
    from plmtool.prune.oneshot import prune_model
    from plmtool.prune.sds import linear_weights

    a = build_tiny_llama(96)
    b = copy.deepcopy(a)
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))
    for pattern, sparsity in (("2:4", 0.5), ("unstructured", 0.6)):
        opts = PruneConfig(method="sparsegpt", pattern=pattern, sparsity=sparsity, batch_size=1)
        info_a = prune_model(a, ids, replace(opts, fuse=True))
        info_b = prune_model(b, ids, replace(opts, fuse=False))
        wa, wb = linear_weights(a), linear_weights(b)
        assert wa.keys() == wb.keys() == info_a.keys() == info_b.keys()
        for k in wa:
            assert torch.equal(wa[k] == 0, wb[k] == 0), k
            assert torch.allclose(wa[k], wb[k], atol=1e-5), k
            assert info_a[k]["sparsegpt_error"] == pytest.approx(info_b[k]["sparsegpt_error"], rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("pattern", [parse_pattern("2:4"), parse_pattern("4:8"), parse_pattern("1:4")], ids=str)
def test_rank_based_nm_mask_equals_topk(pattern):
    from plmtool.prune.patterns import nm_mask, nm_mask_by_rank

    score = torch.randn(64, 128, generator=torch.Generator().manual_seed(5)).abs()  # no ties
    assert torch.equal(nm_mask_by_rank(score, pattern), nm_mask(score, pattern))
    tied = torch.randint(0, 3, (32, 64), generator=torch.Generator().manual_seed(6)).float()
    mask = nm_mask_by_rank(tied, pattern)
    assert verify(tied.masked_fill(mask, 0) + (~mask).float() * 10, pattern) is None  # exactly M-N pruned per group
    assert int(mask.sum()) == tied.numel() * pattern.prune_per_group // pattern.m


def test_semi_structured_wrapper_keeps_outputs_for_any_input_rank():
    """The swap to sparse tensor cores flattens [batch, tokens, hidden] around F.linear (the
    semi-structured tensor takes 2-D inputs only); with the identity in place of the CUDA-only
    conversion, the model's outputs must not change and only 2:4 layers are swapped."""
    from plmtool.prune.magnitude import prune_magnitude
    from plmtool.prune.semi_structured import SemiStructuredLinear, to_semi_structured
    from plmtool.prune.sequential import block_linears, decoder_layers

    model = build_tiny_llama(64)
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block_linears(block).items():
            if not (i == 1 and name == "mlp.down_proj"):  # one layer stays dense
                lin.weight.data = prune_magnitude(lin.weight.data, parse_pattern("2:4"))[0]
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        n = to_semi_structured(model, convert=lambda w: w.clone())
        got = model(input_ids=ids).logits
    assert n == 13
    assert isinstance(model.model.layers[0].self_attn.q_proj, SemiStructuredLinear)
    assert not isinstance(model.model.layers[1].mlp.down_proj, SemiStructuredLinear)
    assert torch.allclose(got, ref, atol=1e-5)
