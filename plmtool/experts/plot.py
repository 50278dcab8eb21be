"""2-D picture of the semantic space: PCA of the embeddings, coloured by cluster, selected marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_space(emb: np.ndarray, labels: np.ndarray, selected: np.ndarray, centroids: np.ndarray, path: str | Path,
               max_points: int = 20000, seed: int = 0, title: str = "semantic space") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    from plmtool.experts.cluster import normalize
    from plmtool.io import atomic_write

    x = normalize(emb)
    idx = np.arange(len(x))
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).choice(len(x), size=max_points, replace=False))
    pca = PCA(n_components=2, random_state=seed).fit(x[idx])
    xy = pca.transform(x[idx])
    cxy = pca.transform(normalize(centroids))
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    cmap = plt.get_cmap("tab10" if len(centroids) <= 10 else "tab20")
    k = len(centroids)
    for c in range(k):
        m = labels[idx] == c
        ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.35, color=cmap(c % cmap.N), label=f"cluster {c} ({int((labels == c).sum())})")
    sel = selected[idx]
    ax.scatter(xy[sel, 0], xy[sel, 1], s=14, facecolors="none", edgecolors="black", linewidths=0.6, label="selected")
    ax.scatter(cxy[:, 0], cxy[:, 1], marker="X", s=120, color="red", edgecolors="white", label="centroids")
    ev = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ev[0]:.1%})")
    ax.set_ylabel(f"PC2 ({ev[1]:.1%})")
    ax.set_title(f"{title}: {len(x)} samples, {int(selected.sum())} selected, K={k}")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
