"""Padded prefills (prefill.py): the padded forward equals the plain one; the self-check rejects a
prefill whose padding leaks; engines decode the same tokens through it."""

from __future__ import annotations

import logging

import pytest
import torch

from draft_decoding_helpers import RandomDrafter, plain_greedy, tiny_llama
from plmtool.draft.decoding import GenerationConfig, SpeculativeEngine
from plmtool.draft.decoding.prefill import PrefillGraphs, bucket_lengths
from plmtool.draft.decoding.target import TargetRunner
from plmtool.errors import PlmtoolError


@pytest.fixture(scope="module")
def target():
    return tiny_llama(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, seed=0)


def test_bucket_lengths_ladder():
    assert bucket_lengths(2048) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    assert bucket_lengths(100) == [16, 24, 32, 48, 64, 96, 100]
    assert bucket_lengths(20) == [16, 20]
    assert bucket_lengths(8) == [8]
    # each length at most 1.5x the one before (the padding a prompt can cost), after the first
    ladder = bucket_lengths(4096)
    assert all(b / a <= 1.5 for a, b in zip(ladder, ladder[1:]))


@pytest.mark.parametrize("n", [1, 5, 16, 17, 23, 24, 40])
def test_padded_prefill_equals_unpadded(target, n):
    runner = TargetRunner(target, 64)
    graphs = PrefillGraphs(runner, cuda_graphs=False)
    assert graphs.lengths == [16, 24, 32, 48, 64]
    prompt = torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    runner.reset()
    logits_ref, hidden_ref = runner.extend(prompt)
    k_ref, v_ref = runner.cache.k[..., :n, :].clone(), runner.cache.v[..., :n, :].clone()
    # the padded forward from a cache left dirty by an earlier, longer request
    runner.reset()
    runner.extend(torch.randint(0, 64, (60,)).tolist())
    runner.reset()
    logits, hidden = graphs(prompt)
    assert runner.length == n and graphs.length_for(n) >= n
    torch.testing.assert_close(hidden, hidden_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, logits_ref[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.cache.k[..., :n, :], k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.cache.v[..., :n, :], v_ref, rtol=1e-5, atol=1e-5)
    assert graphs.check_errors and max(graphs.check_errors.values()) < 1e-5


def test_prefill_refuses_what_it_cannot_do(target):
    runner = TargetRunner(target, 64)
    graphs = PrefillGraphs(runner, lengths=[8, 16], cuda_graphs=False)
    with pytest.raises(PlmtoolError, match="17 tokens outside the prefill lengths 1..16"):
        graphs(list(range(17)))
    with pytest.raises(PlmtoolError, match="0 tokens"):
        graphs([])
    runner.extend([1, 2])
    with pytest.raises(RuntimeError, match="empty cache"):
        graphs([1, 2, 3])
    with pytest.raises(ValueError, match="outside 1..64"):
        PrefillGraphs(runner, lengths=[16, 128], cuda_graphs=False)


def test_self_check_rejects_leaking_padding(target, monkeypatch, caplog):
    """A prefill whose real tokens attend to the padding (no causal mask) fails the self-check,
    and the runner keeps the eager prefill."""
    def leaky(self, b):
        r = self.runner
        slots = r.slot_ids[:b]
        mask = torch.ones(1, 1, b, b, dtype=torch.bool)
        return r.hidden_states(self.ids[:, :b], slots.view(1, b), slots, mask, b)

    monkeypatch.setattr(PrefillGraphs, "_run", leaky)
    with pytest.raises(RuntimeError, match="padded prefill of length 16 differs"):
        PrefillGraphs(TargetRunner(target, 64), cuda_graphs=False)
    runner = TargetRunner(target, 64)
    monkeypatch.setattr(PrefillGraphs, "__init__", lambda self, r: (_ for _ in ()).throw(RuntimeError("no capture")))
    with caplog.at_level(logging.WARNING, logger="plmtool"):
        runner.enable_prefill_graphs()
    assert runner.prefill_graphs is None and "prefill CUDA graphs disabled" in caplog.text


@pytest.mark.parametrize("drafted", [False, True])
def test_engine_decodes_the_same_through_padded_prefills(target, drafted):
    """Greedy decoding (plain and speculative) through the padded prefill equals plain greedy
    decoding of the model; the engine flag and the runner's graphs select the path."""
    runner = TargetRunner(target, 96)
    runner.prefill_graphs = PrefillGraphs(runner, cuda_graphs=False)
    calls = []
    original = PrefillGraphs.__call__

    def counted(self, prompt):
        calls.append(len(prompt))
        return original(self, prompt)

    PrefillGraphs.__call__ = counted
    try:
        drafter = RandomDrafter(32, 64, 3, stateful=True, seed=0) if drafted else None
        tree = [[0], [1], [0, 0], [0, 0, 0]] if drafted else None
        engine = SpeculativeEngine(target, drafter, tree, runner=runner)
        eager = SpeculativeEngine(target, drafter, tree, runner=runner, prefill_graphs=False)
        g = torch.Generator().manual_seed(3)
        for n in (1, 7, 16, 30):
            prompt = torch.randint(3, 64, (n,), generator=g).tolist()
            want = plain_greedy(target, prompt, 12)
            assert engine.generate(prompt, GenerationConfig(max_new_tokens=12)).tokens == want
            assert eager.generate(prompt, GenerationConfig(max_new_tokens=12)).tokens == want
    finally:
        PrefillGraphs.__call__ = original
    assert calls == [1, 7, 16, 30]  # the flagged engine only
