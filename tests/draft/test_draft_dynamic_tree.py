"""Dynamic candidate trees: the per-step pick against a direct computation, and lossless decoding."""

from __future__ import annotations

import pytest
import torch

from plmtool.draft.config import EngineOptions
from plmtool.draft.decoding import GenerationConfig, SpeculativeEngine, build_tree, make_tree, validate_tree
from plmtool.draft.decoding.dynamic_tree import DynamicTree
from plmtool.errors import PlmtoolError
from tests.conftest import build_tiny_llama
from tests.core.cuda_graph_helpers import stand_in_graphs
from tests.draft.decoding_helpers import perturbed_drafter, plain_greedy

# a pool that is not a full product: uneven ranks per depth, as measured tables give
POOL = build_tree([[0.5, 0.2, 0.1, 0.05, 0.03], [0.3, 0.15, 0.08, 0.04], [0.2, 0.1, 0.05]], 40)


@pytest.fixture(scope="module")
def target():
    return build_tiny_llama(64, init_std=0.2)


def reference_pick(heads: torch.Tensor, pool: list[list[int]], nodes: int) -> tuple[list[list[int]], dict]:
    """Direct computation: every pool path's probability (product of the heads' softmax at its
    ranks), the best `nodes - 1` paths, and each path's candidate token."""
    probs = torch.softmax(heads.double(), dim=-1)
    order = torch.argsort(probs, dim=-1, descending=True)
    score = {}
    for p in pool:
        score[tuple(p)] = float(torch.prod(torch.stack([probs[k, order[k, r]] for k, r in enumerate(p)])))
    best = sorted(pool, key=lambda p: -score[tuple(p)])[: nodes - 1]
    token = {tuple(p): int(order[len(p) - 1, p[-1]]) for p in pool}
    return validate_tree(best), token


@pytest.mark.parametrize("nodes", [2, 9, 25, 41])
def test_the_pick_is_the_best_paths_by_the_heads_probabilities(nodes):
    g = torch.Generator().manual_seed(nodes)
    dyn = DynamicTree(POOL, nodes, "cpu", num_heads=3)
    for _ in range(5):
        heads = torch.randn(4, 64, generator=g) * 3  # one row more than the pool is deep: ignored
        tokens = torch.full((nodes,), -1, dtype=torch.long)
        dyn.select(heads, tokens)
        want, token = reference_pick(heads[:3], POOL, nodes)
        assert dyn.choices() == want
        ref = make_tree(want)  # the same node order: the pool is sorted as make_tree sorts
        assert torch.equal(dyn.depth, ref.depth) and torch.equal(dyn.parent, ref.parent)
        assert torch.equal(dyn.ancestors, ref.ancestors)
        assert torch.equal(dyn.paths[:, : ref.paths.shape[1]], ref.paths) and not dyn.paths[:, ref.paths.shape[1]:].any()
        assert tokens[0] == -1 and tokens[1:].tolist() == [token[tuple(p)] for p in want]


@pytest.mark.parametrize("nodes", [2, 3, 4, 12])
def test_a_sure_head_still_gives_a_tree_closed_under_ancestors(nodes):
    """Heads that put all their mass on one token score their chains exactly like their parents in
    fp32 (log 1 = 0); the depth penalty must still rank every parent first."""
    dyn = DynamicTree(POOL, nodes, "cpu", num_heads=3)
    heads = torch.full((3, 64), -1e4)
    heads[:, 5] = 1e4
    dyn.select(heads, torch.zeros(nodes, dtype=torch.long))
    chosen = dyn.choices()
    validate_tree(chosen)  # raises if a node's parent is missing
    chain = [[0], [0, 0], [0, 0, 0]]
    assert all(p in chosen for p in chain[: nodes - 1])  # the sure chain first, as deep as the budget allows


def test_bad_sizes_are_refused():
    with pytest.raises(PlmtoolError, match="pool"):
        DynamicTree(POOL, len(POOL) + 2, "cpu")
    with pytest.raises(PlmtoolError, match="pool"):
        DynamicTree(POOL, 1, "cpu")


@pytest.mark.parametrize("kind", ["amphista", "medusa"])
def test_dynamic_trees_decode_exactly_as_plain_greedy(target, kind):
    drafter = perturbed_drafter(target, kind, seed=4)
    static = build_tree([[0.6, 0.2, 0.1], [0.4, 0.2], [0.3]], 6)
    engine = SpeculativeEngine(target, drafter, tree=static, max_len=128, dynamic_pool=POOL)
    assert engine.dynamic and engine.greedy_loop.tree is engine.dynamic_tree
    g = torch.Generator().manual_seed(2)
    lengths = []
    for i in range(4):
        prompt = torch.randint(3, 64, (int(torch.randint(1, 12, (), generator=g)),), generator=g).tolist()
        ref = plain_greedy(target, prompt, 40)
        out = engine.generate(prompt, max_new_tokens=40)
        assert out.tokens == ref
        lengths += out.accept_lengths
        stop = ref[20]
        out = engine.generate(prompt, GenerationConfig(max_new_tokens=40, stop_token_ids=[stop]))
        assert out.tokens == ref[: ref.index(stop) + 1] and out.finish_reason == "stop"
    assert max(lengths) > 1  # drafted tokens were accepted, not only bonus tokens
    # a sampled request takes the general loop and its static tree; greedy ones afterwards start clean
    engine.generate(prompt, GenerationConfig(max_new_tokens=20, temperature=0.7, seed=0))
    assert engine.generate(prompt, max_new_tokens=40).tokens == ref


def test_dynamic_trees_through_captured_programs(target, monkeypatch):
    """The replay path (CPU stand-ins for CUDA graphs): the pick runs inside the `draft` program and
    the tree step reads the rewritten mask from its buffers."""
    from tests.draft.test_draft_decoding import stand_in_greedy_loop

    stand_in_graphs(monkeypatch)
    drafter = perturbed_drafter(target, "amphista", seed=6)
    engine = SpeculativeEngine(target, drafter, tree=build_tree([[0.6, 0.2], [0.4, 0.2], [0.3]], 8), max_len=128,
                               dynamic_pool=POOL)
    stand_in_greedy_loop(engine, engine.dynamic_tree, engine.dynamic_step)
    seen = set()
    for prompt in ([5, 9, 13], [40, 2, 7, 7, 31, 8], [11]):
        out = engine.generate(prompt, max_new_tokens=40)
        assert out.tokens == plain_greedy(target, prompt, 40)
        seen.add(tuple(map(tuple, engine.dynamic_tree.choices())))
    assert len(seen) > 1  # the tree changed with the drafter's heads


def test_a_dynamic_tree_deeper_than_the_static_one(target):
    """The drafter program is sized for the deeper of the two trees; the general loop (sampling,
    static tree of depth 1) still feeds it correctly."""
    drafter = perturbed_drafter(target, "amphista", seed=8)
    engine = SpeculativeEngine(target, drafter, tree=[[0], [1], [2]], max_len=128, dynamic_pool=POOL)
    assert engine.drafter_step.n == 4
    prompt = [3, 17, 29]
    assert engine.generate(prompt, max_new_tokens=30).tokens == plain_greedy(target, prompt, 30)
    out = engine.generate(prompt, GenerationConfig(max_new_tokens=30, temperature=0.9, seed=3))
    assert len(out.tokens) == 30


def test_expected_node_set_is_independent_of_ties_between_unrelated_nodes():
    """Equal scores at the cut between unrelated nodes may go either way, but never break closure."""
    for nodes in range(2, 20):
        dyn = DynamicTree(POOL, nodes, "cpu", num_heads=3)
        dyn.select(torch.zeros(3, 64), torch.zeros(nodes, dtype=torch.long))  # every rank equally likely
        chosen = dyn.choices()
        validate_tree(chosen)
        assert all(len(p) == 1 for p in chosen[: min(nodes - 1, 5)])  # uniform heads: the shallow nodes first
        assert len(chosen) == nodes - 1


def test_the_pick_has_no_host_value_in_it():
    """`select` runs inside a captured CUDA graph: no host reads, no host tensors copied in (an item
    assignment like `score[0] = x` copies a host scalar, which capture refuses)."""
    from tests.draft.host_sync_recorder import HostSyncRecorder

    dyn = DynamicTree(POOL, 12, "cpu", num_heads=3)
    heads, tokens = torch.randn(3, 64), torch.zeros(12, dtype=torch.long)
    with HostSyncRecorder() as rec:
        dyn.select(heads, tokens)
    assert not rec.counts, dict(rec.counts)


def test_without_the_device_loop_a_dynamic_tree_is_reported_unused(target, caplog):
    drafter = perturbed_drafter(target, "amphista", seed=9)
    with caplog.at_level("WARNING", logger="plmtool"):
        engine = SpeculativeEngine(target, drafter, tree=[[0], [1], [0, 0]], max_len=96, dynamic_pool=POOL,
                                   options=EngineOptions(greedy_loop=False))
    assert not engine.dynamic and "dynamic tree unused" in caplog.text
    assert engine.generate([4, 8, 15], max_new_tokens=20).tokens == plain_greedy(target, [4, 8, 15], 20)


def test_a_diverged_drafter_still_gives_a_valid_tree():
    """NaN logits (a drafter gone wrong) must not rank first and break the tree's closure."""
    dyn = DynamicTree(POOL, 12, "cpu", num_heads=3)
    heads = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    heads[1] = float("nan")
    heads[2, :5] = float("-inf")
    dyn.select(heads, torch.zeros(12, dtype=torch.long))
    chosen = dyn.choices()
    validate_tree(chosen)
    assert torch.equal(dyn.parent, make_tree(chosen).parent)
