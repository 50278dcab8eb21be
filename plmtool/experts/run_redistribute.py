"""Orchestration of `plmtool experts redistribute` (no hydra: usable from scripts).

Stages (each resumable in the run dir): data -> embed (+ need) -> space. Outputs:
  samples.jsonl            the training pool (held-out removed), one sample per line
  heldout.jsonl            held-out samples with their routed cluster
  embeddings.npy / heldout_embeddings.npy / need.npy
  manifest.jsonl           one line per pool sample: id, cluster, density, weight, selected (+ random, mode, task)
  centroids.npy            router centroids (unit norm)
  shards/expert_<k>.jsonl  the selected samples of cluster k (one training shard per expert)
  selected.jsonl / random.jsonl   the redistributed and the random subset of the same size
  random_balanced.jsonl    task-labelled pools: a random subset of that size with an equal share per task
  replicates/<r>/          experts.replicates > 1: the same subset files (and shards/) drawn with seed + r
  redistribution.json      what `experts train` needs to know (encoder, lengths, K, seed)
  semantic_space.png       PCA picture
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from plmtool.errors import PlmtoolError
from plmtool.experts.embed import embed_cached, make_embedder
from plmtool.experts.need import KINDS as NEED_KINDS
from plmtool.experts.need import need_signal
from plmtool.experts.router import Router
from plmtool.data.chat import split_heldout
from plmtool.experts.samples import load_samples, prompt_text, read_samples, write_samples
from plmtool.experts.redistribute import allocate, balanced_subset, random_subset, task_floor
from plmtool.experts.space import build_space, select, validate
from plmtool.io import Stages, atomic_write, read_json, write_json

log = logging.getLogger("plmtool")
Loader = Callable[[], tuple[Any, Any]]


def save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr)

    atomic_write(path, write)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    atomic_write(path, write)


def load_meta(redistribution: str | None) -> tuple[Path, dict[str, Any]]:
    """The run dir of a finished redistribution and its redistribution.json (written after its data, shards and centroids)."""
    if not redistribution:
        raise PlmtoolError("experts.redistribution is required: the run dir of `plmtool experts redistribute`")
    d = Path(redistribution).expanduser()
    if not (d / "redistribution.json").is_file():
        raise PlmtoolError(f"{d} is not a finished redistribution run (no redistribution.json)")
    return d, read_json(d / "redistribution.json")


def check_options(o: Any) -> None:
    """Everything that can be checked before reading data or loading a model."""
    validate(o)
    if not 0.0 <= o.heldout < 1.0:
        raise PlmtoolError(f"experts.heldout must be in [0, 1), got {o.heldout}")
    if o.need not in NEED_KINDS:
        raise PlmtoolError(f"unknown experts.need '{o.need}' (choose from {', '.join(NEED_KINDS)})")
    if o.limit is not None and o.limit < 1:
        raise PlmtoolError(f"experts.limit must be >= 1 or null, got {o.limit}")
    if o.max_len < 8 or o.max_prompt_len < 1 or o.max_prompt_len >= o.max_len:
        raise PlmtoolError(f"need 1 <= experts.max_prompt_len < experts.max_len (got {o.max_prompt_len}, {o.max_len})")
    if o.density.method not in ("dbscan", "knn"):
        raise PlmtoolError(f"unknown experts.density.method '{o.density.method}' (choose dbscan or knn)")
    if o.task_floor < 1:
        raise PlmtoolError(f"experts.task_floor must be >= 1 (a task is never emptied), got {o.task_floor}")
    if o.replicates < 1:
        raise PlmtoolError(f"experts.replicates must be >= 1, got {o.replicates}")


def pool_tasks(samples: list[dict[str, Any]]) -> np.ndarray | None:
    """The task of every sample, or None unless every sample has one (a task-labelled pool)."""
    tasks = [s.get("task") for s in samples]
    return np.array([str(t) for t in tasks]) if tasks and all(tasks) else None


def stratified_limit(samples: list[dict[str, Any]], limit: int, floor: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of `limit` with every task's share of the pool (each task at least `floor`), in pool order."""
    tasks = pool_tasks(samples)
    names, inverse = np.unique(tasks, return_inverse=True)
    quotas = allocate(np.bincount(inverse), limit, floor=floor, alpha=1.0)
    keep: list[int] = []
    for t in range(len(names)):
        members = np.flatnonzero(inverse == t)
        keep += members[np.random.default_rng([seed, 4, t]).choice(len(members), int(quotas[t]), replace=False)].tolist()
    return [samples[i] for i in sorted(keep)]


def heldout_split(samples: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(pool, held-out) indices; in a task-labelled pool drawn per task, so every task keeps its share."""
    tasks = pool_tasks(samples)
    if tasks is None:
        return split_heldout(len(samples), round(len(samples) * fraction), seed)
    train: list[int] = []
    held: list[int] = []
    for t, name in enumerate(np.unique(tasks)):
        members = np.flatnonzero(tasks == name)
        tr, he = split_heldout(len(members), round(len(members) * fraction), seed * 1009 + t)
        train += members[tr].tolist()
        held += members[he].tolist()
    return sorted(train), sorted(held)


def check_task_floor(pool: list[dict[str, Any]], floor: int) -> None:
    tasks = pool_tasks(pool)
    if tasks is None:
        return
    names, counts = np.unique(tasks, return_counts=True)
    for name, n in zip(names, counts):
        if n < floor:
            raise PlmtoolError(f"task '{name}' has {n} samples in the pool (held-out removed), fewer than "
                               f"experts.task_floor={floor}: lower experts.task_floor or give the task more data")


@dataclass
class Replicate:
    """One draw of the budgeted subsets: redistributed, random and task-balanced random, all of one size."""

    selected: np.ndarray
    random: np.ndarray
    balanced: np.ndarray | None
    floor_added: dict[str, int]


def replicates(space, need: np.ndarray | None, o: Any, seed: int, tasks: np.ndarray | None) -> list[Replicate]:
    """Replicate r draws with seed + r (replicate 0 is the space's own selection); the clustering is shared."""
    out = []
    for r in range(o.replicates):
        red = space.redistribution if r == 0 else select(space.labels, space.k, space.density, need, o, seed + r)
        selected, added = (red.selected, {}) if tasks is None else task_floor(red.selected, tasks, red.weight, o.task_floor)
        n = int(selected.sum())
        balanced = None if tasks is None else balanced_subset(tasks, n, seed + r)
        out.append(Replicate(selected, random_subset(len(selected), n, seed + r), balanced, added))
    return out


def replicate_dir(run_dir: Path, r: int) -> Path:
    return run_dir if r == 0 else run_dir / "replicates" / str(r)


def run(o: Any, run_dir: Path, seed: int, load: Loader, model_id: str, cache: Path | None) -> dict[str, Any]:
    check_options(o)
    run_dir = Path(run_dir)
    stages = Stages(run_dir)
    timings: dict[str, float] = {}

    # 1. data and the held-out split
    t = time.perf_counter()
    if not stages.done("data"):
        stratify = o.data == "commonsense" and o.limit is not None
        data = load_samples(o.data, None if stratify else o.limit, o.turns)
        samples = data.samples
        read = len(samples)
        if stratify:
            samples = data.samples = stratified_limit(samples, o.limit, o.task_floor, seed)
        # the held-out part never enters clustering or training
        train_idx, held_idx = heldout_split(samples, o.heldout, seed)
        validate(o, len(train_idx))  # K vs number of samples, before any model is loaded
        check_task_floor([samples[i] for i in train_idx], o.task_floor)
        write_samples(run_dir / "samples.jsonl", [samples[i] for i in train_idx])
        write_samples(run_dir / "heldout.jsonl", [samples[i] for i in held_idx])
        stages.mark("data", {"pool": len(train_idx), "heldout": len(held_idx), **data.summary(),
                             **({"read": read, "limit_rule": "a seeded sample stratified by task"} if stratify else {})})
    pool = read_samples(run_dir / "samples.jsonl")
    held = read_samples(run_dir / "heldout.jsonl")
    validate(o, len(pool))
    timings["data"] = time.perf_counter() - t

    # 2. embeddings (cached across runs) and the model's need signal
    t = time.perf_counter()
    model = tokenizer = None
    if not stages.done("embed"):
        if o.embedder == "model" or o.need != "none":
            model, tokenizer = load()
        embedder = make_embedder(o.embedder, model, tokenizer, model_id=model_id, layer=o.embed_layer,
                                 max_len=o.embed_max_len, batch_size=o.embed_batch_size)
        texts = [prompt_text(s) for s in pool] + [prompt_text(s) for s in held]
        emb, info = embed_cached(embedder, texts, cache)
        save_npy(run_dir / "embeddings.npy", emb[: len(pool)])
        save_npy(run_dir / "heldout_embeddings.npy", emb[len(pool):])
        need = None
        if o.need != "none":
            cuda = next(model.parameters()).device.type == "cuda"  # bf16 autocast on GPUs, as in training
            need = need_signal(model, tokenizer, pool, o.need, o.max_len, o.max_prompt_len, o.batch_size, autocast=cuda)
        if need is not None:
            save_npy(run_dir / "need.npy", need)
        stages.mark("embed", info)
    embed_info = stages.result("embed")
    emb = np.load(run_dir / "embeddings.npy")
    held_emb = np.load(run_dir / "heldout_embeddings.npy")
    need = np.load(run_dir / "need.npy") if (run_dir / "need.npy").is_file() else None
    timings["embed"] = time.perf_counter() - t

    # 3. the semantic space: cluster, density, redistribution (cheap: always recomputed)
    t = time.perf_counter()
    space = build_space(emb, o, need=need, seed=seed)
    timings.update({f"space_{k}": v for k, v in space.seconds.items()})
    router = Router(space.centroids)
    held_cluster = router.route(held_emb) if len(held) else np.zeros(0, dtype=np.int64)
    red, dens = space.redistribution, space.density
    tasks = pool_tasks(pool)
    reps = replicates(space, need, o, seed, tasks)
    first = reps[0]
    manifest = [
        {"id": s["id"], "cluster": int(space.labels[i]), "density": round(float(dens.density[i]), 6),
         "weight": round(float(red.weight[i]), 6), "selected": bool(first.selected[i]), "random": bool(first.random[i]),
         "random_balanced": None if first.balanced is None else bool(first.balanced[i]),
         "mode": int(dens.mode[i]), "need": None if need is None else round(float(need[i]), 6), "task": s.get("task")}
        for i, s in enumerate(pool)
    ]
    write_jsonl(run_dir / "manifest.jsonl", manifest)
    router.save(run_dir / "centroids.npy")
    for r, rep in enumerate(reps):
        out = replicate_dir(run_dir, r)
        for c in range(space.k):
            write_samples(out / "shards" / f"expert_{c}.jsonl", [pool[i] for i in np.flatnonzero(rep.selected & (space.labels == c))])
        write_samples(out / "selected.jsonl", [pool[i] for i in np.flatnonzero(rep.selected)])
        write_samples(out / "random.jsonl", [pool[i] for i in np.flatnonzero(rep.random)])
        if rep.balanced is not None:
            write_samples(out / "random_balanced.jsonl", [pool[i] for i in np.flatnonzero(rep.balanced)])
    write_samples(run_dir / "heldout.jsonl", held, extra={"cluster": [int(c) for c in held_cluster]})
    write_json(run_dir / "redistribution.json", {
        "model": model_id, "embedder": o.embedder, "embed_layer": o.embed_layer, "embed_max_len": o.embed_max_len,
        "k": space.k, "max_len": o.max_len, "max_prompt_len": o.max_prompt_len, "seed": seed, "data": o.data,
        "replicates": len(reps), "tasks": None if tasks is None else sorted(set(tasks.tolist())),
    })
    timings["space"] = time.perf_counter() - t
    if o.plot:
        t = time.perf_counter()
        from plmtool.experts.plot import plot_space

        plot_space(emb, space.labels, first.selected, space.centroids, run_dir / "semantic_space.png", o.plot_points, seed)
        timings["plot"] = time.perf_counter() - t
    data = stages.result("data")
    return make_report(o, pool, held, held_cluster, space, reps, need, embed_info, timings, seed, data)


def make_report(o, pool, held, held_cluster, space, reps, need, embed_info, timings, seed, data) -> dict[str, Any]:
    red, dens = space.redistribution, space.density
    sel, rand = reps[0].selected, reps[0].random
    clusters = []
    for c in range(space.k):
        m = space.labels == c
        clusters.append({
            "cluster": c,
            "size_before": int(m.sum()),
            "size_after": int((m & sel).sum()),
            "size_random": int((m & rand).sum()),
            "quota": int(red.quotas[c]),
            "heldout": int((held_cluster == c).sum()),
            "eps": round(dens.eps.get(c, 0.0), 6),
            "dense_modes": int(dens.n_modes.get(c, 0)),
            "tail": int((m & (dens.mode < 0)).sum()),
            "tail_selected": int((m & (dens.mode < 0) & sel).sum()),
            "mean_need": None if need is None else float(need[m].mean()),
            "mean_need_selected": None if need is None or not (m & sel).any() else float(need[m & sel].mean()),
            "examples": [pool[i]["messages"][0]["content"][:80] for i in np.flatnonzero(m)[:2]],
        })
    report: dict[str, Any] = {
        "total": len(pool),
        "selected": int(sel.sum()),
        "budget": float(o.budget),
        "budget_samples": red.budget_n,
        "floors_exceed_budget": red.floors_exceed_budget,
        "heldout": len(held),
        "k": space.k,
        "k_scores": {str(k): v for k, v in space.k_scores.items()},
        "embedder": embed_info,
        "need": o.need,
        "density_method": o.density.method,
        "tail_total": int((dens.mode < 0).sum()),
        "tail_selected": int(((dens.mode < 0) & sel).sum()),
        "clusters": clusters,
        "seed": seed,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        # what was read: usable conversations and the records skipped on the way (by reason)
        "data": {"source": data.get("source", o.data), "conversations": data.get("conversations"),
                 "skipped": data.get("skipped", {}),
                 **({"read": data["read"], "limit_rule": data["limit_rule"]} if "limit_rule" in data else {})},
    }
    tasks = [s.get("task") for s in pool]
    if any(tasks):
        table: dict[str, dict[str, int]] = {}
        for t, c in zip(tasks, space.labels):
            row = table.setdefault(str(t), {})
            row[str(int(c))] = row.get(str(int(c)), 0) + 1
        report["task_cluster"] = table
        report["task_selected"] = dict(Counter(str(t) for t, s in zip(tasks, sel) if s))
    labels = pool_tasks(pool)
    if labels is not None:
        held_tasks = Counter(str(s.get("task")) for s in held)
        report["tasks"] = {
            t: {"size_before": int((labels == t).sum()), "size_after": int(((labels == t) & sel).sum()),
                "size_random": int(((labels == t) & rand).sum()),
                "size_random_balanced": int(((labels == t) & reps[0].balanced).sum()),
                "heldout": held_tasks.get(t, 0), "floor_added": reps[0].floor_added.get(t, 0)}
            for t in sorted(set(labels.tolist()))
        }
        report["task_floor"] = int(o.task_floor)
    if len(reps) > 1:
        report["replicates"] = [{"seed": seed + r, "selected": int(rep.selected.sum()), "floor_added": rep.floor_added}
                                for r, rep in enumerate(reps)]
    if o.plot:
        report["plot"] = "semantic_space.png"
    return report
