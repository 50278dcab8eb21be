"""SDS in Gram form: objective equals the token form, re-dense and adjustment decrease it, guard."""

from __future__ import annotations

import math

import pytest
import torch

from plmtool.errors import PlmtoolError
from plmtool.prune.config import OptimConfig
from plmtool.prune.patterns import parse_pattern, verify
from plmtool.prune.sds import Reconstruction, adjust, redense, token_loss
from plmtool.prune.stats import InputStats
from plmtool.prune.wanda import prune_wanda


def _layer(rows=32, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    X = torch.randn(tokens, cols, generator=g) * torch.rand(cols, generator=g).mul(3).add(0.1)
    st = InputStats(cols, "cpu", gram=True)
    for part in X.chunk(4):
        st.add(part.unsqueeze(0))
    return W, X, st


def test_gram_loss_equals_token_loss():
    W, X, st = _layer()
    Ws, _ = prune_wanda(W, st.sq_norm, parse_pattern("2:4"))
    rec = Reconstruction(W, st.gram)
    for cand in (Ws, W + 0.01 * torch.randn_like(W), torch.zeros_like(W)):
        assert math.isclose(rec.loss(cand), token_loss(W, cand, X), rel_tol=1e-4)
    # the gradient of the Gram form is the token-form gradient
    cand = Ws.clone().requires_grad_(True)
    ((X @ (cand - W).t()) ** 2).sum().div((X @ W.t()).pow(2).sum()).backward()
    _, grad = rec.loss_and_grad(Ws)
    assert torch.allclose(grad, cand.grad, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.02), ("sgd", 1.0)])
def test_redense_decreases_loss(optimizer, lr):
    W, X, st = _layer()
    Ws, _ = prune_wanda(W, st.sq_norm, parse_pattern("2:4"))
    rec = Reconstruction(W, st.gram)
    out, hist = redense(Ws, rec, OptimConfig(iterations=40, lr=lr, optimizer=optimizer), l1=0.0, l2=0.0)
    h = hist["history"]
    assert h[-1] < 0.5 * h[0]
    # mostly monotone: the loss at the end of each quarter keeps falling
    quarters = [h[len(h) * k // 4] for k in range(4)] + [h[-1]]
    assert all(b <= a * 1.01 for a, b in zip(quarters, quarters[1:]))
    assert rec.loss(out) < rec.loss(Ws)
    assert (out == 0).float().mean() < 0.05  # every entry was trainable


def test_penalties_shrink_weights():
    W, X, st = _layer()
    Ws, _ = prune_wanda(W, st.sq_norm, parse_pattern("2:4"))
    rec = Reconstruction(W, st.gram)
    opts = OptimConfig(iterations=60, lr=1.0, optimizer="sgd")
    plain, _ = redense(Ws, rec, opts, l1=0.0, l2=0.0)
    shrunk, _ = redense(Ws, rec, opts, l1=0.5, l2=0.5)
    assert shrunk.abs().sum() < plain.abs().sum()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured"])
def test_adjust_keeps_pattern_and_does_not_increase_loss(pattern):
    pat = parse_pattern(pattern, 0.5)
    W, X, st = _layer()
    Ws, _ = prune_wanda(W, st.sq_norm, pat)
    rec = Reconstruction(W, st.gram)
    out, hist = adjust(Ws, rec, pat, OptimConfig(iterations=30, lr=0.05))
    assert verify(out, pat) is None
    assert rec.loss(out) < rec.loss(Ws)


def test_divergence_guard_halves_step_and_logs(caplog):
    W, X, st = _layer()
    Ws, _ = prune_wanda(W, st.sq_norm, parse_pattern("2:4"))
    rec = Reconstruction(W, st.gram)
    # 50x the largest stable SGD step: diverges, gets caught, step reduced until it converges
    out, hist = redense(Ws, rec, OptimConfig(iterations=40, lr=50.0, optimizer="sgd", schedule="constant"), l1=0.0, l2=0.0)
    assert hist["retries"] >= 1
    assert "diverged" in caplog.text
    assert torch.isfinite(out).all()
    assert rec.loss(out) <= rec.loss(Ws)


def test_optimiser_settings_built_in_code_are_checked():
    W, X, st = _layer()
    rec = Reconstruction(W, st.gram)
    with pytest.raises(PlmtoolError, match="prune.sds.redense.optimizer=lion"):
        redense(W, rec, OptimConfig(optimizer="lion"), l1=0.0, l2=0.0)
