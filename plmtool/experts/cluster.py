"""Clustering of sample embeddings on the unit sphere (cosine geometry, as the router uses).

k-means runs on L2-normalised embeddings (Euclidean distance on the sphere is monotone in cosine
distance); centroids are then normalised and every sample is assigned to its nearest centroid by
cosine, so the router reproduces the training assignment exactly.
"""

from __future__ import annotations

import numpy as np

from plmtool.errors import PlmtoolError

CRITERIA = ("silhouette", "calinski_harabasz")


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 3, max_iter: int = 100,
           fit_size: int | None = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """(labels [n], unit-norm centroids [k, d]) of spherical-ish k-means on the rows of `x`.

    With more than `fit_size` rows the centroids are fitted on a seeded subsample of that size and
    every row is then assigned: for K in the tens, 20k points (hundreds per cluster) pin the centroids down and
    220k samples cluster in seconds instead of minutes.
    """
    from sklearn.cluster import KMeans

    n = len(x)
    if k < 1:
        raise PlmtoolError(f"number of clusters must be >= 1, got {k}")
    if k > n:
        raise PlmtoolError(f"number of clusters K={k} is larger than the number of samples ({n})")
    xn = normalize(x)
    fit = xn
    if fit_size and n > fit_size:
        fit = xn[np.sort(np.random.default_rng([seed, 3]).choice(n, size=fit_size, replace=False))]
    km = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, random_state=seed).fit(fit)
    centroids = normalize(km.cluster_centers_)
    labels = np.argmax(xn @ centroids.T, axis=1)
    if len(np.unique(labels)) < k:
        # cosine re-assignment emptied a cluster (rare, degenerate data): fall back to k-means' own
        # assignment (Euclidean to the unnormalised centres)
        labels = km.predict(xn)
    return labels.astype(np.int64), centroids


def score(x: np.ndarray, labels: np.ndarray, criterion: str, seed: int = 0, sample_size: int = 4000) -> float:
    """Higher is better. Silhouette (cosine) is computed on a seeded subsample for speed."""
    from sklearn.metrics import calinski_harabasz_score, silhouette_score

    if criterion == "silhouette":
        return float(silhouette_score(x, labels, metric="cosine", sample_size=min(sample_size, len(x)), random_state=seed))
    if criterion == "calinski_harabasz":
        return float(calinski_harabasz_score(normalize(x), labels))
    raise PlmtoolError(f"unknown K criterion '{criterion}' (choose from {', '.join(CRITERIA)})")


def choose_k(
    x: np.ndarray, k_min: int, k_max: int, criterion: str = "silhouette", seed: int = 0, n_init: int = 3,
    fit_size: int | None = 20_000,
) -> tuple[int, np.ndarray, np.ndarray, dict[int, float]]:
    """Search K in [k_min, k_max]; returns (best K, its labels, its centroids, score per K)."""
    if criterion not in CRITERIA:
        raise PlmtoolError(f"unknown K criterion '{criterion}' (choose from {', '.join(CRITERIA)})")
    if k_min < 2 or k_max < k_min:
        raise PlmtoolError(f"K search range must satisfy 2 <= k_min <= k_max, got [{k_min}, {k_max}]")
    if k_max >= len(x):
        raise PlmtoolError(f"K search up to {k_max} needs more than {k_max} samples (have {len(x)})")
    scores: dict[int, float] = {}
    best = None
    for k in range(k_min, k_max + 1):
        labels, centroids = kmeans(x, k, seed=seed, n_init=n_init, fit_size=fit_size)
        s = score(x, labels, criterion, seed=seed) if len(np.unique(labels)) > 1 else float("-inf")
        scores[k] = s
        if best is None or s > best[0]:
            best = (s, k, labels, centroids)
    assert best is not None
    return best[1], best[2], best[3], scores
