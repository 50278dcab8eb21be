"""Time the redistribution step (cluster -> density -> budgeted selection) on given embeddings.

The claim checked here is a CPU one: 220k samples with 384-d embeddings (the paper's data size,
all-MiniLM-L6-v2's width) redistributed in at most 60 s on a 2-core CPU. Embeddings are
synthetic but shaped like sentence embeddings: a Zipf-sized mixture of topics on the unit sphere,
each topic with its own spread and a few dense near-duplicate pockets, plus a uniform tail.

    python scripts/bench_experts_redistribute.py                  # 220k x 384, K=8
    python scripts/bench_experts_redistribute.py --k 16 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def synthetic_embeddings(n: int, dim: int, topics: int = 60, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, topics + 1) ** 1.1  # Zipf-like topic sizes: a head and a long tail
    counts = rng.multinomial(int(n * 0.97), weights / weights.sum())
    centers = rng.normal(size=(topics, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    parts = []
    for c, m in zip(centers, counts):
        spread = rng.uniform(0.3, 0.9)
        pts = c + spread * rng.normal(size=(m, dim)) / np.sqrt(dim)
        dup = rng.random(m) < 0.2  # near-duplicate pockets (templated prompts)
        if dup.any():
            anchors = pts[rng.integers(0, m, size=8)]
            pts[dup] = anchors[rng.integers(0, 8, size=dup.sum())] + 0.02 * rng.normal(size=(dup.sum(), dim)) / np.sqrt(dim)
        parts.append(pts)
    parts.append(rng.normal(size=(n - int(counts.sum()), dim)))  # uniform tail
    x = np.concatenate(parts).astype(np.float32)
    return x[rng.permutation(len(x))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=220_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--density", default="dbscan", choices=["dbscan", "knn"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from threadpoolctl import threadpool_info

    from plmtool.experts.config import RedistributeConfig
    from plmtool.experts.space import build_space

    t = time.perf_counter()
    emb = synthetic_embeddings(args.n, args.dim, seed=args.seed)
    gen_s = time.perf_counter() - t
    o = RedistributeConfig(k=args.k, budget=args.budget, need="none")
    o.density.method = args.density
    load_before = os.getloadavg()
    t, c = time.perf_counter(), time.process_time()
    space = build_space(emb, o, seed=args.seed)
    total, cpu = time.perf_counter() - t, time.process_time() - c
    red = space.redistribution
    result = {
        "n": args.n, "dim": args.dim, "k": args.k, "budget": args.budget, "density": args.density,
        "selected": int(red.selected.sum()), "tail_selected": int((red.selected & (space.density.mode < 0)).sum()),
        "tail_total": int((space.density.mode < 0).sum()),
        "seconds": {**{k: round(v, 2) for k, v in space.seconds.items()}, "total": round(total, 2)},
        # process CPU time (all threads): the wall time on a shared machine depends on the others
        "cpu_seconds": round(cpu, 2), "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "generate_embeddings_s": round(gen_s, 2),
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "blas_threads": [i.get("num_threads") for i in threadpool_info()],
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"| n | dim | K | cluster s | density s | select s | total s (wall) | CPU s (all threads) | load avg | selected | tail kept |")
    print(f"|---|---|---|---|---|---|---|---|---|---|---|")
    s = result["seconds"]
    print(f"| {args.n} | {args.dim} | {args.k} | {s['cluster']} | {s['density']} | {s['select']} | {s['total']} | {result['cpu_seconds']} | "
          f"{result['loadavg_before'][0]} | {result['selected']} | {result['tail_selected']}/{result['tail_total']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
