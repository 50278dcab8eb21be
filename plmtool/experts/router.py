"""Route a query to experts: nearest centroid by cosine (top-1), or a top-k blend.

The top-k blend weights are a softmax over the k best cosine similarities divided by a
temperature; they mix the experts' next-token distributions (see routed.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plmtool.errors import PlmtoolError


class Router:
    def __init__(self, centroids: np.ndarray):
        from plmtool.experts.cluster import normalize

        centroids = np.asarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or len(centroids) == 0:
            raise PlmtoolError("router needs a non-empty [K, d] centroid matrix")
        self.centroids = normalize(centroids)

    @property
    def k(self) -> int:
        return len(self.centroids)

    def scores(self, emb: np.ndarray) -> np.ndarray:
        from plmtool.experts.cluster import normalize

        emb = np.atleast_2d(np.asarray(emb, dtype=np.float32))
        if emb.shape[1] != self.centroids.shape[1]:
            raise PlmtoolError(f"embedding size {emb.shape[1]} does not match the router's centroids ({self.centroids.shape[1]})")
        return normalize(emb) @ self.centroids.T

    def route(self, emb: np.ndarray) -> np.ndarray:
        """Top-1 expert index per row."""
        return np.argmax(self.scores(emb), axis=1)

    def top_k(self, emb: np.ndarray, k: int, temperature: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        """(indices [n, k] best first, blend weights [n, k] summing to 1)."""
        if k < 1:
            raise PlmtoolError(f"router top_k must be >= 1, got {k}")
        if temperature <= 0:
            raise PlmtoolError(f"router temperature must be > 0, got {temperature}")
        k = min(k, self.k)
        s = self.scores(emb)
        idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(s, idx, axis=1) / temperature
        top = top - top.max(axis=1, keepdims=True)
        w = np.exp(top)
        return idx, w / w.sum(axis=1, keepdims=True)

    def save(self, path: str | Path) -> None:
        from plmtool.io import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, self.centroids)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "Router":
        path = Path(path)
        if not path.is_file():
            raise PlmtoolError(f"router centroids {path} not found")
        return cls(np.load(path))
