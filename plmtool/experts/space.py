"""The semantic space of given embeddings: cluster -> density -> redistribution, with timings.

This is the whole CPU-side method once embeddings (and optionally the need signal) exist;
`scripts/bench_experts_redistribute.py` times exactly this function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from plmtool.errors import PlmtoolError
from plmtool.experts.cluster import choose_k, kmeans
from plmtool.experts.density import DensityResult, estimate_density
from plmtool.experts.redistribute import Redistribution, check_budget, random_subset, redistribute


@dataclass
class SpaceResult:
    k: int
    labels: np.ndarray
    centroids: np.ndarray
    density: DensityResult
    redistribution: Redistribution
    random: np.ndarray  # bool mask of the random baseline with the same size
    k_scores: dict[int, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def validate(o: Any, n: int | None = None) -> None:
    """Config checks that need no data (and, with n, the ones that need its size)."""
    check_budget(o.budget)
    if o.floor < 1:
        raise PlmtoolError(f"experts.floor must be >= 1 (a cluster is never emptied), got {o.floor}")
    if o.k is not None and o.k < 1:
        raise PlmtoolError(f"experts.k must be >= 1 (or null to search K), got {o.k}")
    if o.k is None and (o.k_min < 2 or o.k_max < o.k_min):
        raise PlmtoolError(f"K search range must satisfy 2 <= experts.k_min <= experts.k_max, got [{o.k_min}, {o.k_max}]")
    if n is not None:
        if n == 0:
            raise PlmtoolError("no samples left to cluster")
        if o.k is not None and o.k > n:
            raise PlmtoolError(f"experts.k={o.k} is larger than the number of training samples ({n})")
        if o.k is None and o.k_max >= n:
            raise PlmtoolError(f"experts.k_max={o.k_max} needs more than {o.k_max} training samples (have {n})")


def build_space(emb: np.ndarray, o: Any, need: np.ndarray | None = None, seed: int = 0) -> SpaceResult:
    """Cluster, estimate density and select the budget; `o` is a RedistributeConfig-like object."""
    validate(o, len(emb))
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    scores: dict[int, float] = {}
    if o.k is None:
        k, labels, centroids, scores = choose_k(emb, o.k_min, o.k_max, o.k_criterion, seed=seed, n_init=o.kmeans_n_init,
                                           fit_size=o.kmeans_fit_size)
    else:
        k = int(o.k)
        labels, centroids = kmeans(emb, k, seed=seed, n_init=o.kmeans_n_init, fit_size=o.kmeans_fit_size)
    seconds["cluster"] = time.perf_counter() - t
    t = time.perf_counter()
    d = o.density
    dens = estimate_density(emb, labels, k=d.k, quantile=d.quantile, ref_size=d.ref_size, seed=seed, method=d.method)
    seconds["density"] = time.perf_counter() - t
    t = time.perf_counter()
    red = select(labels, k, dens, need, o, seed)
    rand = random_subset(len(emb), int(red.selected.sum()), seed)
    seconds["select"] = time.perf_counter() - t
    return SpaceResult(k=k, labels=labels, centroids=centroids, density=dens, redistribution=red, random=rand,
                       k_scores=scores, seconds=seconds)


def select(labels: np.ndarray, k: int, dens: DensityResult, need: np.ndarray | None, o: Any, seed: int) -> Redistribution:
    """The redistributed selection of the clustered pool for one seed (replicates redraw only this)."""
    d = o.density
    return redistribute(
        labels, k, dens.radius, dens.mode, need=need, budget=o.budget, floor=o.floor, alpha=o.alpha, beta=o.beta,
        mode_alpha=o.mode_alpha if d.method == "dbscan" else 0.0, gamma=o.gamma,
        tail_boost=o.tail_boost if d.method == "dbscan" else 1.0, seed=seed,
    )
