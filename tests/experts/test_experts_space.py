"""Experts: clustering, density, redistribution and routing on synthetic embeddings with known groups."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from plmtool.errors import PlmtoolError
from plmtool.experts.cluster import choose_k, kmeans, normalize
from plmtool.experts.config import RedistributeConfig
from plmtool.experts.density import estimate_density
from plmtool.experts.redistribute import allocate, redistribute, weighted_sample
from plmtool.experts.router import Router
from plmtool.experts.space import build_space


def blobs(sizes=(300, 200, 60, 12), dim=32, seed=0, spread=0.15):
    """Groups around random directions of the unit sphere (what sentence embeddings look like)."""
    rng = np.random.default_rng(seed)
    centers = normalize(rng.normal(size=(len(sizes), dim)))
    x = np.concatenate([c + spread * rng.normal(size=(n, dim)) / np.sqrt(dim) for c, n in zip(centers, sizes)])
    y = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return x.astype(np.float32), y


def test_kmeans_recovers_known_groups():
    x, y = blobs()
    labels, centroids = kmeans(x, 4, seed=0)
    assert adjusted_rand_score(y, labels) > 0.99
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    # labels are exactly the router's nearest-centroid choice
    assert (Router(centroids).route(x) == labels).all()


def test_k_search_finds_the_number_of_groups():
    x, y = blobs(sizes=(150, 120, 90, 60, 40), dim=24, seed=1)
    k, labels, _, scores = choose_k(x, 2, 8, "silhouette", seed=0)
    assert k == 5, scores
    assert adjusted_rand_score(y, labels) > 0.99


def test_router_picks_nearest_centroid_by_cosine():
    rng = np.random.default_rng(3)
    centroids = rng.normal(size=(7, 16)) * rng.uniform(0.1, 10, size=(7, 1))  # unnormalised on purpose
    queries = rng.normal(size=(500, 16)) * rng.uniform(0.1, 10, size=(500, 1))
    router = Router(centroids)
    # brute force: cosine similarity of every query with every centroid
    cos = np.array([[q @ c / np.linalg.norm(q) / np.linalg.norm(c) for c in centroids] for q in queries])
    assert (router.route(queries) == cos.argmax(1)).all()
    idx, w = router.top_k(queries, 3, temperature=0.1)
    assert (idx[:, 0] == cos.argmax(1)).all()
    assert (np.take_along_axis(cos, idx, 1)[:, :-1] >= np.take_along_axis(cos, idx, 1)[:, 1:]).all()
    assert np.allclose(w.sum(1), 1) and (w[:, 0] >= w[:, 1]).all()
    with pytest.raises(PlmtoolError):
        router.route(np.zeros((1, 5)))


def test_allocate_hits_budget_respects_floors_and_sizes():
    sizes = np.array([1000, 400, 50, 5, 1])
    q = allocate(sizes, 100, floor=8, alpha=0.5)
    assert q.sum() == 100
    assert (q <= sizes).all()
    assert (q >= np.minimum(sizes, 8)).all()
    # sqrt shares: the big cluster is thinned more than proportionally
    assert q[0] / sizes[0] < q[2] / sizes[2]
    assert allocate(sizes, 100, floor=8, alpha=1.0)[0] > q[0]
    # floors larger than the budget: floors win, nothing is emptied
    qf = allocate(sizes, 10, floor=8)
    assert (qf == np.minimum(sizes, 8)).all()
    assert allocate(sizes, int(sizes.sum()), floor=1).tolist() == sizes.tolist()


def test_weighted_sampling_follows_weights():
    rng = np.random.default_rng(0)
    w = np.array([1.0] * 90 + [20.0] * 10)
    hits = np.zeros(100)
    for _ in range(400):
        hits[weighted_sample(w, 10, rng)] += 1
    assert hits[90:].mean() > 5 * hits[:90].mean()
    assert len(set(weighted_sample(w, 10, rng).tolist())) == 10


def run_space(x, seed=0, **kw):
    o = RedistributeConfig(k=4, budget=0.1, floor=8, need="none", **kw)
    o.density.k = 5
    return build_space(x, o, need=None, seed=seed)


def test_redistribution_budget_floors_and_determinism():
    x, _ = blobs()
    a = run_space(x, seed=0)
    b = run_space(x, seed=0)
    c = run_space(x, seed=1)
    red = a.redistribution
    assert red.selected.sum() == round(0.1 * len(x)) == red.budget_n
    sizes = np.bincount(a.labels, minlength=4)
    after = np.bincount(a.labels[red.selected], minlength=4)
    assert (after >= np.minimum(sizes, 8)).all()
    assert (after == red.quotas).all()
    assert (a.labels == b.labels).all() and (red.selected == b.redistribution.selected).all()
    assert np.array_equal(red.weight, b.redistribution.weight)
    assert (red.selected != c.redistribution.selected).any()
    assert a.random.sum() == red.selected.sum()


def test_tail_cluster_is_never_emptied():
    x, y = blobs(sizes=(2000, 1500, 3), seed=2)
    d = estimate_density(x, y, k=5)
    for alpha in (0.0, 0.5, 1.0):
        for seed in range(3):
            red = redistribute(y, 3, d.radius, d.mode, budget=0.01, floor=1, alpha=alpha, seed=seed)
            assert (red.selected & (y == 2)).sum() >= 1
            assert red.selected.sum() == 35
    # proportional rounding alone would give the tail cluster nothing
    assert round(3 * 0.01) == 0


def test_dense_regions_thinned_tail_kept():
    rng = np.random.default_rng(5)
    dim = 16
    center = normalize(rng.normal(size=(1, dim)))[0]
    dense = center + 0.02 * rng.normal(size=(900, dim)) / np.sqrt(dim)
    sparse = center + 0.6 * rng.normal(size=(100, dim)) / np.sqrt(dim)
    x = np.concatenate([dense, sparse]).astype(np.float32)
    o = RedistributeConfig(k=1, budget=0.1, floor=1, need="none")
    o.density.k = 10
    s = build_space(x, o, seed=0)
    sel = s.redistribution.selected
    assert sel.sum() == 100
    assert sel[900:].mean() > 3 * sel[:900].mean()  # the tail is kept far more often
    d = estimate_density(x, np.zeros(len(x), dtype=int), k=10, quantile=0.5)
    assert d.density[:900].mean() > d.density[900:].mean()
    assert (d.mode[900:] < 0).mean() > (d.mode[:900] < 0).mean()  # DBSCAN noise = the sparse tail


def test_need_signal_tilts_selection():
    x, _ = blobs(sizes=(400,), seed=4)
    need = np.ones(400)
    need[:40] = 5.0
    o = RedistributeConfig(k=1, budget=0.1, floor=1, need="loss", gamma=1.0)
    s = build_space(x, o, need=need, seed=0)
    assert s.redistribution.selected[:40].mean() > 2 * s.redistribution.selected[40:].mean()


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5])
def test_budget_outside_unit_interval_is_an_error(budget):
    x, _ = blobs()
    with pytest.raises(PlmtoolError, match="budget"):
        build_space(x, RedistributeConfig(k=3, budget=budget))


def test_k_larger_than_samples_is_an_error():
    x, _ = blobs(sizes=(5, 4))
    with pytest.raises(PlmtoolError, match="larger than the number"):
        build_space(x, RedistributeConfig(k=20))
