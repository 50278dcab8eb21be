"""Density in the semantic space: k-NN radius and an adaptive DBSCAN (eps from the data).

Per cluster, every point's k-th-nearest-neighbour distance is measured against a seeded reference
subsample of that cluster (at most `ref_size` points). That keeps the cost at O(n * ref_size * d)
instead of O(n^2 d) - 220k points stay within seconds - and within one cluster the subsampled
radius is a monotone proxy of the full one, which is all the ranking below needs.

Adaptive DBSCAN: eps of a cluster = the `quantile` of its k-NN radii (so eps adapts to each
cluster's own scale), min_samples = k. DBSCAN itself (scikit-learn) runs on the reference points;
every other point joins the dense mode of its nearest reference core point within eps, else it is
noise: the long tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from plmtool.errors import PlmtoolError


@dataclass
class DensityResult:
    radius: np.ndarray  # [n] distance to the k-th nearest neighbour (unit-sphere Euclidean)
    density: np.ndarray  # [n] cluster median radius / own radius (>1: denser than its cluster's typical point)
    mode: np.ndarray  # [n] global id of the DBSCAN dense mode, -1 = noise (tail)
    core: np.ndarray  # [n] bool: DBSCAN core point (w.r.t. the reference)
    eps: dict[int, float]  # per cluster
    n_modes: dict[int, int]  # per cluster


def _knn(x: np.ndarray, k: int, ref_size: int, rng: np.random.Generator):
    """Distances/indices of the k+1 nearest reference points, the reference indices, and radius."""
    from sklearn.neighbors import NearestNeighbors

    n = len(x)
    ref = np.sort(rng.choice(n, size=ref_size, replace=False)) if n > ref_size else np.arange(n)
    kk = min(k + 1, len(ref))
    nn = NearestNeighbors(n_neighbors=kk, algorithm="brute").fit(x[ref])
    dist, idx = nn.kneighbors(x)
    in_ref = np.zeros(n, dtype=bool)
    in_ref[ref] = True
    # a reference point finds itself first (distance 0): skip that column for it
    col_ref = min(k, kk - 1)
    col_other = min(k - 1, kk - 1)
    radius = np.where(in_ref, dist[:, col_ref], dist[:, col_other])
    return dist, idx, ref, in_ref, radius


def estimate_density(
    x: np.ndarray, labels: np.ndarray, k: int = 10, quantile: float = 0.5, ref_size: int = 2048, seed: int = 0,
    method: str = "dbscan",
) -> DensityResult:
    """k-NN radius per point within its cluster, plus adaptive-DBSCAN modes when method='dbscan'."""
    from sklearn.cluster import DBSCAN

    from plmtool.experts.cluster import normalize

    if method not in ("dbscan", "knn"):
        raise PlmtoolError(f"unknown density method '{method}' (choose dbscan or knn)")
    if k < 1:
        raise PlmtoolError(f"experts.density.k must be >= 1, got {k}")
    if not 0.0 < quantile < 1.0:
        raise PlmtoolError(f"experts.density.quantile must be in (0, 1), got {quantile}")
    x = normalize(x)
    n = len(x)
    radius = np.zeros(n, dtype=np.float64)
    density = np.ones(n, dtype=np.float64)
    mode = np.full(n, -1, dtype=np.int64)
    core = np.zeros(n, dtype=bool)
    eps_of: dict[int, float] = {}
    modes_of: dict[int, int] = {}
    next_mode = 0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([seed, int(c)])
        if len(members) < 2:
            # a singleton cluster: nothing to compare with; it is tail by definition
            radius[members] = 0.0
            eps_of[int(c)] = 0.0
            modes_of[int(c)] = 0
            continue
        xc = x[members]
        dist, idx, ref, in_ref, r = _knn(xc, k, ref_size, rng)
        radius[members] = r
        med = float(np.median(r))
        density[members] = med / np.maximum(r, 1e-12) if med > 0 else 1.0
        eps = float(np.quantile(r, quantile))
        eps_of[int(c)] = eps
        if method == "knn" or eps <= 0:
            modes_of[int(c)] = 0
            continue
        min_samples = min(k + 1, len(ref))  # sklearn counts the point itself
        db = DBSCAN(eps=eps, min_samples=min_samples, metric="euclidean", algorithm="brute").fit(xc[ref])
        ref_core = np.zeros(len(ref), dtype=bool)
        ref_core[db.core_sample_indices_] = True
        ref_label = db.labels_
        # each point joins the mode of its nearest reference core point within eps (self included)
        ok = ref_core[idx] & (dist <= eps)
        has = ok.any(axis=1)
        first = np.argmax(ok, axis=1)
        local_mode = np.where(has, ref_label[idx[np.arange(len(xc)), first]], -1)
        is_core = r <= eps
        n_local = int(ref_label.max()) + 1 if (ref_label >= 0).any() else 0
        mode[members] = np.where(local_mode >= 0, local_mode + next_mode, -1)
        core[members] = is_core
        modes_of[int(c)] = n_local
        next_mode += n_local
    return DensityResult(radius=radius, density=density, mode=mode, core=core, eps=eps_of, n_modes=modes_of)
