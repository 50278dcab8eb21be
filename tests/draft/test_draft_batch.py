"""Continuous batching (batch.py) against independent references: every sequence of a batch equals
the same request decoded alone by plain greedy decoding, whoever shares its steps and whenever it
joins or leaves; sampling follows the request's own seed."""

from __future__ import annotations

import pytest
import torch

from plmtool.draft.decoding.batch import BatchEngine, batch_buckets, span_buckets
from plmtool.draft.decoding.engine import GenerationConfig, SpeculativeEngine
from plmtool.draft.decoding.kv_cache import StaticKVCache
from tests.conftest import build_tiny_llama
from tests.draft.decoding_helpers import perturbed_drafter, plain_greedy

TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]]


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(64, init_std=0.2)


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (int(torch.randint(1, 14, (), generator=g)),), generator=g).tolist() for _ in range(n)]


def run_all(engine: BatchEngine, requests: list[tuple[list[int], GenerationConfig]], join_every: int = 0) -> list[list[int]]:
    """Decode every request; with `join_every`, a new request joins every that many steps (else as
    soon as a row is free), so sequences enter and leave mid-flight."""
    results: dict[int, list[int]] = {}
    pending = list(enumerate(requests))
    steps = 0
    while pending or engine.seqs:
        while pending and engine.free and (not join_every or steps % join_every == 0 or not engine.seqs):
            i, (prompt, gen) = pending.pop(0)
            out = engine.add(prompt, gen, tag=i)
            if out.done:
                results[i] = out.seq.result.tokens
            if join_every:
                break
        for out in engine.step():
            if out.done:
                results[out.seq.tag] = out.seq.result.tokens
        steps += 1
    return [results[i] for i in range(len(requests))]


def test_buckets():
    assert span_buckets(2048) == [512, 1024, 2048] and span_buckets(300) == [300]
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(6) == [1, 2, 4, 6]


@pytest.mark.parametrize("kind", ["amphista", "medusa", None])
@pytest.mark.parametrize("join_every", [0, 3])
def test_every_sequence_equals_plain_greedy_alone(target, kind, join_every):
    drafter = perturbed_drafter(target, kind, seed=3) if kind else None
    engine = BatchEngine(target, drafter, TREE if kind else None, max_len=96, max_batch=4)
    ps = prompts(9)
    lengths = [5 + (7 * i) % 17 for i in range(len(ps))]  # sequences leave at different steps
    got = run_all(engine, [(p, GenerationConfig(max_new_tokens=m)) for p, m in zip(ps, lengths)], join_every)
    for p, m, tokens in zip(ps, lengths, got):
        assert tokens == plain_greedy(target, p, m)
    assert not engine.seqs and engine.stats.sequence_steps >= engine.stats.steps


def test_batched_steps_are_fewer_than_sequential_ones(target):
    drafter = perturbed_drafter(target, "amphista", seed=3)
    ps = prompts(4, seed=5)
    gens = [GenerationConfig(max_new_tokens=12) for _ in ps]
    batched = BatchEngine(target, drafter, TREE, max_len=96, max_batch=4)
    got = run_all(batched, list(zip(ps, gens)))
    alone = BatchEngine(target, drafter, TREE, max_len=96, max_batch=1)
    assert run_all(alone, list(zip(ps, gens))) == got
    assert batched.stats.steps < alone.stats.steps
    assert batched.stats.rows.get(4, 0) >= 1 and set(alone.stats.rows) == {1}


def test_sampling_follows_the_batch1_engine_with_the_same_seed(target):
    """Temperature > 0: the batch's verification of a row is the batch-1 engine's, with the same
    generator, so a seeded request gives the batch-1 engine's tokens whoever shares the batch."""
    drafter = perturbed_drafter(target, "amphista", seed=3)
    ps = prompts(3, seed=7)
    gens = [GenerationConfig(max_new_tokens=15, temperature=0.9, seed=11 + i) for i in range(3)]
    single = SpeculativeEngine(target, drafter, TREE, max_len=96)
    want = [single.generate(p, GenerationConfig(max_new_tokens=15, temperature=0.9, seed=11 + i)).tokens
            for i, p in enumerate(ps)]
    mixed = [(p, g) for p, g in zip(ps, gens)] + [(prompts(1, seed=9)[0], GenerationConfig(max_new_tokens=15))]
    got = run_all(BatchEngine(target, drafter, TREE, max_len=96, max_batch=4), mixed)
    assert got[:3] == want


def test_stop_tokens_and_removal_keep_the_others_intact(target):
    drafter = perturbed_drafter(target, "amphista", seed=3)
    ps = prompts(4, seed=2)
    ref = [plain_greedy(target, p, 20) for p in ps]
    stop = ref[1][4]
    engine = BatchEngine(target, drafter, TREE, max_len=96, max_batch=4)
    outs = [engine.add(p, GenerationConfig(max_new_tokens=20, stop_token_ids=[stop] if i == 1 else []), tag=i)
            for i, p in enumerate(ps)]
    results = {}

    def record(step):
        results.update({o.seq.tag: (o.seq.result.tokens, o.seq.result.finish_reason) for o in step if o.done})

    record(engine.step())
    engine.remove(outs[0].seq)  # a cancelled request: its row is taken by the last one
    while engine.seqs:
        record(engine.step())
    assert results[1] == (ref[1][: ref[1].index(stop) + 1], "stop")
    assert results[2][0] == ref[2] and results[3][0] == ref[3]
    assert 0 not in results


def test_a_full_batch_refuses_and_a_long_prompt_is_refused_before_prefill(target):
    engine = BatchEngine(target, None, None, max_len=32, max_batch=2)
    for p in prompts(2):
        engine.add(p, GenerationConfig(max_new_tokens=4))
    with pytest.raises(Exception, match="rows are decoding"):
        engine.add([5], GenerationConfig(max_new_tokens=4))
    with pytest.raises(Exception, match="exceeds the context"):
        BatchEngine(target, None, None, max_len=32, max_batch=2).add(list(range(3, 33)), GenerationConfig(max_new_tokens=4))


def test_compact_rows_matches_per_row_compact():
    g = torch.Generator().manual_seed(0)
    cache = StaticKVCache(2, 2, 8, 20, batch_size=3)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    ref = [StaticKVCache(2, 2, 8, 20) for _ in range(3)]
    for r in range(3):
        ref[r].k.copy_(cache.k[:, r : r + 1])
        ref[r].v.copy_(cache.v[:, r : r + 1])
    start = torch.tensor([2, 7, 0])
    paths = torch.tensor([[0, 2, 5, 0], [0, 1, 3, 4], [0, 4, 0, 0]])
    cache.compact_rows(start, paths)
    for r in range(3):
        ref[r].compact(int(start[r]), paths[r])
        assert torch.equal(cache.k[:, r : r + 1], ref[r].k) and torch.equal(cache.v[:, r : r + 1], ref[r].v)


def test_captured_bucket_programs_decode_losslessly(target, monkeypatch):
    """With every bucket's target and drafter step captured (CPU stand-ins for CUDA graphs, each
    checked against eager at capture) over spans of 16, 32, 64 and 96 slots, the batch still
    decodes exactly plain greedy as its sequences outgrow the shorter spans."""
    from plmtool.draft.config import EngineOptions
    from plmtool.draft.decoding import batch
    from tests.core.cuda_graph_helpers import stand_in_graphs

    stand_in_graphs(monkeypatch)
    monkeypatch.setattr(EngineOptions, "graphs_on", lambda self, device: True)
    monkeypatch.setattr(batch, "SHORTEST_SPAN", 16)
    drafter = perturbed_drafter(target, "amphista", seed=3)
    engine = BatchEngine(target, drafter, TREE, max_len=96, max_batch=3)
    assert engine.spans == [16, 32, 64, 96] and {s.span for s in engine.steps.values()} == {16, 32, 64, 96}
    assert engine.cuda_graphs and all(p.graph is not None for p in engine.drafter_steps.values())
    assert engine.prefill_graphs is not None and engine.drafter_prefills is not None  # padded prefills, spare row
    ps = prompts(5, seed=8)
    got = run_all(engine, [(p, GenerationConfig(max_new_tokens=40)) for p in ps], join_every=2)
    assert got == [plain_greedy(target, p, 40) for p in ps]


def test_smaller_trees_for_fuller_batches_stay_lossless(target):
    """Buckets of more rows may decode with smaller trees (sequences move between buckets as
    others join and leave): every sequence still equals plain greedy decoding alone."""
    drafter = perturbed_drafter(target, "amphista", seed=3)
    small = {2: [[0], [1], [0, 0]], 4: [[0]]}
    engine = BatchEngine(target, drafter, TREE, max_len=96, max_batch=4, bucket_trees=small)
    assert [engine.trees[b].n for b in (1, 2, 4)] == [len(TREE) + 1, 4, 2]
    ps = prompts(7, seed=4)
    lengths = [6 + (5 * i) % 13 for i in range(len(ps))]
    got = run_all(engine, [(p, GenerationConfig(max_new_tokens=m)) for p, m in zip(ps, lengths)], join_every=2)
    assert got == [plain_greedy(target, p, m) for p, m in zip(ps, lengths)]
    assert {1, 2, 4} <= set(engine.stats.rows)
    with pytest.raises(Exception, match="buckets are"):
        BatchEngine(target, drafter, TREE, max_len=96, max_batch=4, bucket_trees={3: [[0]]})


def test_bucket_trees_share_the_step_between_rows():
    """step_tokens // rows nodes per row (root included): an auto tree is rebuilt at that size from
    its accuracies (the best tree of that size), another tree keeps its first nodes."""
    from types import SimpleNamespace

    from plmtool.draft.decoding.tree import build_tree, validate_tree
    from plmtool.draft.setup import bucket_trees

    acc = [[0.5, 0.2, 0.1], [0.3, 0.1, 0.05], [0.2, 0.1, 0.05]]
    tree = build_tree(acc, 20)
    auto = SimpleNamespace(tree=tree, rank_accuracy=acc, drafter=SimpleNamespace(num_heads=3))
    got = bucket_trees(auto, [1, 2, 4, 8, 16], 64)
    assert set(got) == {4, 8, 16}  # 64 // 2 - 1 = 31 paths hold the whole 20-path tree
    assert got[4] == build_tree(acc, 15) and got[16] == build_tree(acc, 3)
    listed = SimpleNamespace(tree=tree, rank_accuracy=None, drafter=SimpleNamespace(num_heads=3))
    prefix = bucket_trees(listed, [8], 64)[8]
    assert prefix == tree[:7] and validate_tree(prefix) == prefix
    assert bucket_trees(auto, [1, 16], None) == {}


def test_plain_sampling_with_typical_acceptance_keeps_top_p(target):
    """One-node trees have nothing to accept: a sampled token comes from the top-p filtered
    distribution, as in the batch-1 engine (a top_p that keeps one token decodes greedily)."""
    engine = BatchEngine(target, None, None, max_len=96, max_batch=2)
    p = prompts(1, seed=3)[0]
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=1e-6, acceptance="typical", seed=1)
    assert engine.generate(p, gen).tokens == plain_greedy(target, p, 12)
