"""Padded prefills (prefill.py): the padded forward equals the plain one; the self-check rejects a
prefill whose padding leaks; engines decode the same tokens through it. The same for the drafter's
padded prefill (DrafterPrefills): same heads and drafter cache as the eager `step` prefill."""

from __future__ import annotations

import logging

import pytest
import torch

from plmtool.draft.config import EngineOptions
from plmtool.draft.decoding import GenerationConfig, SpeculativeEngine
from plmtool.draft.decoding.drafter_step import DrafterProgram
from plmtool.draft.decoding.prefill import DrafterPrefills, PrefillGraphs, bucket_lengths, drafter_prefills, lengths_up_to
from plmtool.draft.decoding.target import TargetRunner
from plmtool.errors import PlmtoolError
from tests.conftest import build_tiny_llama
from tests.core.cuda_graph_helpers import stand_in_graphs
from tests.draft.decoding_helpers import RandomDrafter, perturbed_drafter, plain_greedy


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(64, init_std=0.2)


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
        eager = SpeculativeEngine(target, drafter, tree, runner=runner, options=EngineOptions(prefill_graphs=False))
        # on the CPU no engine prefills through them (no CUDA graphs): turned on by hand here
        assert not engine.use_prefill_graphs
        engine.use_prefill_graphs = True
        g = torch.Generator().manual_seed(3)
        for n in (1, 7, 16, 30):
            prompt = torch.randint(3, 64, (n,), generator=g).tolist()
            want = plain_greedy(target, prompt, 12)
            assert engine.generate(prompt, GenerationConfig(max_new_tokens=12)).tokens == want
            assert eager.generate(prompt, GenerationConfig(max_new_tokens=12)).tokens == want
    finally:
        PrefillGraphs.__call__ = original
    assert calls == [1, 7, 16, 30]  # the flagged engine only


# ----------------------------------------------------------------------------- the drafter's prefill

DRAFTERS = {"amphista": ("amphista", {}), "amphista-stateless": ("amphista", {"use_staged_adaptation": False}),
            "medusa": ("medusa", {})}
TREE = [[0], [1], [0, 0], [0, 1], [0, 0, 0]]


def _drafter(target, name: str, seed: int = 0):
    kind, overrides = DRAFTERS[name]
    return perturbed_drafter(target, kind, seed, **overrides)


def _step_program(drafter, max_len: int) -> DrafterProgram:
    """What the engine builds: the fixed-shape drafter step over one engine-lifetime cache."""
    with torch.no_grad():
        cache = drafter.new_cache(1, max_len, torch.device("cpu"), torch.float32)
    return DrafterProgram(drafter, cache, 4, 32, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_padded_drafter_prefill_equals_the_eager_step(target, name):
    """For prompts at and between the ladder's lengths, the padded drafter prefill (run eagerly)
    returns the heads of the eager `drafter.step` prefill and leaves the same drafter cache: the
    prompt's slots, the host-side length and the device-side start, even after a longer prompt
    had dirtied the slots past it."""
    drafter = _drafter(target, name)
    step = _step_program(drafter, 64)
    prefills = DrafterPrefills(step, bucket_lengths(64), cuda_graphs=False)
    assert prefills.lengths == [16, 24, 32, 48, 64] and max(prefills.check_errors.values()) < 1e-5
    runner = TargetRunner(target, 64)
    g = torch.Generator().manual_seed(1)
    for n in (1, 5, 16, 17, 23, 24, 40, 63):
        prompt = torch.randint(0, 64, (n + 1,), generator=g).tolist()
        runner.reset()
        _, hidden = runner.extend(prompt[:n])
        nxt = prompt[1:]
        ref_cache = drafter.new_cache(1, 64)
        with torch.no_grad():
            ref = drafter.step(hidden.unsqueeze(0), torch.tensor([nxt]), ref_cache)
        drafter.crop_cache(step.cache, 0)
        prefills(torch.randn(60, 32), list(range(60)))  # a longer request before this one
        drafter.crop_cache(step.cache, 0)
        heads = prefills(hidden, nxt)
        torch.testing.assert_close(heads, ref, rtol=1e-5, atol=1e-5)
        if step.cache is None:  # Medusa: stateless
            continue
        assert int(step.cache.start) == int(ref_cache.start)
        if name == "amphista":
            assert step.cache.length == ref_cache.length == int(step.cache.start) == n
        for got, want in zip(step.cache.layers, ref_cache.layers):
            torch.testing.assert_close(got.k[..., :n, :], want.k[..., :n, :], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.v[..., :n, :], want.v[..., :n, :], rtol=1e-5, atol=1e-5)


def test_padded_drafter_prefill_refuses_what_it_cannot_do(target):
    drafter = _drafter(target, "amphista")
    step = _step_program(drafter, 32)
    prefills = DrafterPrefills(step, [8, 16], cuda_graphs=False)
    with pytest.raises(PlmtoolError, match="17 tokens outside the prefill lengths 1..16"):
        prefills(torch.randn(17, 32), list(range(17)))
    prefills(torch.randn(3, 32), [1, 2, 3])
    with pytest.raises(RuntimeError, match="empty drafter cache"):
        prefills(torch.randn(3, 32), [1, 2, 3])
    with pytest.raises(ValueError, match="outside 1..32"):
        DrafterPrefills(step, [16, 64], cuda_graphs=False)
    assert lengths_up_to(96, 80) == [16, 24, 32, 48, 64, 96] and lengths_up_to(2048, 100) == [16, 24, 32, 48, 64, 96, 128]


@pytest.mark.parametrize("name", ["amphista", "medusa"])
@pytest.mark.parametrize("shift", [-1, 1])
def test_drafter_prefill_self_check_catches_an_off_by_one_count(target, monkeypatch, caplog, name, shift):
    """A padded prefill that takes one row too many or too few (the count off by one) fails the
    self-check against the eager step; the engine is then left with the eager prefill."""
    original = DrafterProgram.__call__

    def off_by_one(self, count):
        return original(self, min(max(count + shift, 1), self.n))

    step = _step_program(_drafter(target, name), 64)
    monkeypatch.setattr(DrafterProgram, "__call__", off_by_one)
    with pytest.raises(RuntimeError, match="padded drafter prefill of length 16 differs"):
        DrafterPrefills(step, bucket_lengths(64), cuda_graphs=False)
    with caplog.at_level(logging.WARNING, logger="plmtool"):
        assert drafter_prefills(step, bucket_lengths(64), cuda_graphs=False) is None
    assert "drafter prefill CUDA graphs disabled" in caplog.text
    if step.cache is not None:
        assert step.cache.length == 0 and int(step.cache.start) == 0


@pytest.mark.parametrize("name", list(DRAFTERS))
@pytest.mark.parametrize("replayed", [False, True])
def test_engine_decodes_the_same_through_padded_drafter_prefills(target, monkeypatch, name, replayed):
    """Greedy decoding (device loop and general loop) and sampling through the padded drafter
    prefill equal the eager drafter prefill, step for step, and greedy equals plain greedy; only
    the engine whose prefill flag is on calls it. `replayed`: the prefills as
    captured (stand-in graphs that recompute into their captured outputs, one pool for all)."""
    if replayed:
        stand_in_graphs(monkeypatch)
    calls = []
    original = DrafterPrefills.__call__
    monkeypatch.setattr(DrafterPrefills, "__call__", lambda self, h, t: calls.append(h.shape[0]) or original(self, h, t))
    drafter = _drafter(target, name, seed=2)
    padded = SpeculativeEngine(target, drafter, TREE, max_len=96)
    eager = SpeculativeEngine(target, drafter, TREE, max_len=96, options=EngineOptions(prefill_graphs=False))
    off = SpeculativeEngine(target, drafter, TREE, max_len=96)
    # on the CPU no drafter step is captured, so no engine builds them itself: attach them, and
    # turn them on where a CUDA engine would (the switch itself: test_graph_options_on_a_cuda_device)
    assert padded.drafter_prefills is None and not padded.use_prefill_graphs
    padded.use_prefill_graphs = True
    lengths = lengths_up_to(96, 96 - 1 - padded.tree.n)
    for engine in (padded, eager, off):
        engine.drafter_prefills = DrafterPrefills(engine.drafter_step, lengths, cuda_graphs=replayed)
        assert all((p.graph is not None) == replayed for p in engine.drafter_prefills.programs.values())
    calls.clear()  # the self-checks' prefills
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 16, 17, 30):
        prompt = torch.randint(3, 64, (n,), generator=g).tolist()
        want = plain_greedy(target, prompt, 12)
        for gen in (GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=12, temperature=0.7, seed=n)):
            a, b, c = (e.generate(prompt, gen) for e in (padded, eager, off))
            assert a.tokens == b.tokens == c.tokens and a.accept_lengths == b.accept_lengths == c.accept_lengths
            if gen.temperature == 0:
                assert a.tokens == want
    assert calls == [1, 1, 7, 7, 16, 16, 17, 17, 30, 30]  # the flagged engine only, greedy and sampled
    # the general loop (greedy, read the verdict first) through the padded prefill too
    padded.greedy_loop = None
    assert padded.generate([5, 9, 11], max_new_tokens=12).tokens == plain_greedy(target, [5, 9, 11], 12)
