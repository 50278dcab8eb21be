"""Perplexity protocol (DESIGN.md §3) against a direct computation on a tiny random Llama."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from plmtool.errors import PlmtoolError
from plmtool.eval.perplexity import perplexity
from tests.conftest import build_tiny_llama

VOCAB = 97


@pytest.fixture(scope="module")
def tiny_llama():
    return build_tiny_llama(VOCAB, max_position_embeddings=64)


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (16 * 10 + 7,), generator=g)  # 10 windows of 16 + a 7-token tail


def reference_ppl(model, ids, seqlen, n_windows):
    """Hand-written protocol: each window on its own, shifted labels, mean NLL over every prediction."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n_windows):
            window = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
            logits = model(window).logits[0].double()
            total += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
            count += seqlen - 1
    return math.exp(total / count), count


def test_matches_direct_computation(tiny_llama, stream):
    out = perplexity(tiny_llama, stream, seqlen=16)
    ref, predicted = reference_ppl(tiny_llama, stream, 16, 10)
    assert out["ppl"] == pytest.approx(ref, rel=1e-5)
    assert out["nll"] == pytest.approx(math.log(ref), rel=1e-5)
    assert out["windows"] == 10 and out["seqlen"] == 16
    assert out["tokens"] == 160 and out["predicted"] == predicted == 150


def test_matches_reference_mean_of_window_losses(tiny_llama, stream):
    # The Wanda/SparseGPT eval_ppl: mean loss per window * seqlen, summed, / (nsamples * seqlen).
    nlls = []
    with torch.no_grad():
        for w in range(10):
            x = stream[w * 16 : (w + 1) * 16].unsqueeze(0)
            logits = tiny_llama(x).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
            nlls.append(loss.float() * 16)
    ref = torch.exp(torch.stack(nlls).sum() / (10 * 16)).item()
    assert perplexity(tiny_llama, stream, seqlen=16)["ppl"] == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("batch_size", [2, 3, 10, 64])
def test_batching_invariance(tiny_llama, stream, batch_size):
    one = perplexity(tiny_llama, stream, seqlen=16, batch_size=1)
    many = perplexity(tiny_llama, stream, seqlen=16, batch_size=batch_size)
    assert many["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
    assert many["windows"] == one["windows"] == 10


def test_max_tokens_caps_whole_windows(tiny_llama, stream):
    out = perplexity(tiny_llama, stream, seqlen=16, max_tokens=16 * 4 + 5)  # 4 whole windows fit
    ref, _ = reference_ppl(tiny_llama, stream, 16, 4)
    assert out["windows"] == 4 and out["tokens"] == 64
    assert out["ppl"] == pytest.approx(ref, rel=1e-5)
    # A cap above the stream length changes nothing.
    assert perplexity(tiny_llama, stream, seqlen=16, max_tokens=10_000)["windows"] == 10


def test_tail_is_dropped(tiny_llama, stream):
    # Changing only the 7 tail tokens must not change the result.
    other = stream.clone()
    other[-7:] = (other[-7:] + 1) % VOCAB
    assert perplexity(tiny_llama, other, seqlen=16)["ppl"] == perplexity(tiny_llama, stream, seqlen=16)["ppl"]
    # ... while changing a token inside the scored windows does.
    other = stream.clone()
    other[5] = (other[5] + 1) % VOCAB
    assert perplexity(tiny_llama, other, seqlen=16)["ppl"] != perplexity(tiny_llama, stream, seqlen=16)["ppl"]


def test_windows_are_independent(tiny_llama, stream):
    # Non-overlapping windows with no carried context: shuffling whole windows keeps the number.
    windows = stream[:160].view(10, 16)
    shuffled = windows[torch.randperm(10, generator=torch.Generator().manual_seed(0))].reshape(-1)
    assert perplexity(tiny_llama, shuffled, seqlen=16)["ppl"] == pytest.approx(
        perplexity(tiny_llama, stream, seqlen=16)["ppl"], rel=1e-6
    )


def test_accepts_2d_single_row_and_low_precision(tiny_llama, stream):
    out = perplexity(tiny_llama, stream.unsqueeze(0), seqlen=16)
    assert out["windows"] == 10
    bf16 = perplexity(tiny_llama.to(torch.bfloat16), stream, seqlen=16)
    tiny_llama.to(torch.float32)
    ref, _ = reference_ppl(tiny_llama, stream, 16, 10)
    assert bf16["ppl"] == pytest.approx(ref, rel=5e-2)


def test_errors(tiny_llama, stream):
    with pytest.raises(PlmtoolError, match="fewer than one window"):
        perplexity(tiny_llama, stream[:15], seqlen=16)
    with pytest.raises(PlmtoolError, match="max_tokens"):
        perplexity(tiny_llama, stream, seqlen=16, max_tokens=8)
    with pytest.raises(PlmtoolError, match="seqlen"):
        perplexity(tiny_llama, stream, seqlen=1)
    with pytest.raises(PlmtoolError, match="1-D"):
        perplexity(tiny_llama, stream[:32].view(2, 16), seqlen=16)


def test_warns_when_seqlen_exceeds_max_positions(tiny_llama, caplog):
    ids = torch.randint(0, VOCAB, (80,), generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING, logger="plmtool"):
        out = perplexity(tiny_llama, ids, seqlen=80)  # max_position_embeddings is 64: warned, not clamped
    assert out["seqlen"] == 80 and out["windows"] == 1
    assert any("max_position_embeddings" in r.getMessage() for r in caplog.records)


def test_training_mode_restored(tiny_llama, stream):
    tiny_llama.train()
    try:
        perplexity(tiny_llama, stream, seqlen=16)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


@pytest.mark.real_model
def test_smollm2_perplexity_in_sane_range():
    from omegaconf import OmegaConf

    from plmtool.config import ModelConfig
    from plmtool.data.corpora import eval_tokens
    from plmtool.models import load_model

    model, tokenizer = load_model(OmegaConf.structured(ModelConfig()))
    ids = eval_tokens(tokenizer, "wiki_sample")
    out = perplexity(model, ids, seqlen=512, batch_size=4, max_tokens=16384)
    assert out["windows"] == 32 and out["tokens"] == 16384
    assert 10 < out["ppl"] < 40, out
