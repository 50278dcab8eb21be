"""Orchestration of `plmtool experts train` (no hydra: usable from scripts).

Units (each one LoRA adapter, trained for the same number of epochs over its own data, i.e. the
same budget per sample):
  full           the whole pool (100%)
  random         a uniform random subset of the redistributed size
  redistributed  the redistributed subset (one adapter over all clusters)
  expert_<k>     cluster k's share of the redistributed subset (routed by nearest centroid)
  expert_<k>_cluster
                 with experts.expert_data=cluster, instead: every pool sample of cluster k, so the
                 experts together see the whole pool, as `full` does (the same data in all)

Adapters are saved under `adapters_dir` (default `<redistribution>/adapters`) with a fingerprint
of everything that determines them, so independent jobs (`experts.expert_index=0,1,2 -m`, a Slurm
array) fill the same directory and a later `experts.mode=assemble` run evaluates them; a run that
finds an adapter with the same fingerprint reuses it (resume). A unit killed while training resumes
from its last checkpoint (`adapters_dir/checkpoints/<unit>-<fingerprint>.pt`, written every
`trainer.save_every` steps, removed once the adapter is saved) and ends as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from plmtool.errors import PlmtoolError
from plmtool.experts.losses import encoded_losses, mean_loss
from plmtool.experts.lora import BASE, adapter_meta, add_adapters, load_adapter, lora_config, save_adapter, train_adapter
from plmtool.experts.routed import RoutedExperts, check_expert_data, expert_name
from plmtool.experts.run_redistribute import load_meta
from plmtool.experts.router import Router
from plmtool.experts.samples import read_samples
from plmtool.experts.tokenize import encode
from plmtool.train_config import check_trainer
from plmtool.train_loop import resolved_precision

log = logging.getLogger("plmtool")
BASELINES = ("full", "random", "redistributed")
MODES = ("all", "assemble", "generate")
UNIT_FILES = {"full": "samples.jsonl", "random": "random.jsonl", "redistributed": "selected.jsonl"}


def unit_file(d: Path, unit: str) -> Path:
    return d / (UNIT_FILES[unit] if unit in UNIT_FILES else f"shards/{unit}.jsonl")


def whole_clusters(d: Path, k: int) -> list[list[dict[str, Any]]]:
    """The pool samples of each cluster as the redistribution's manifest assigns them, in pool order."""
    pool = read_samples(d / "samples.jsonl")
    manifest = read_samples(d / "manifest.jsonl")
    if [m["id"] for m in manifest] != [s["id"] for s in pool]:
        raise PlmtoolError(f"{d}: manifest.jsonl and samples.jsonl list other samples (an unfinished or mixed redistribution run)")
    clusters: list[list[dict[str, Any]]] = [[] for _ in range(k)]
    for m, s in zip(manifest, pool):
        clusters[int(m["cluster"])].append(s)
    return clusters


def expert_samples(d: Path, k: int, expert_data: str) -> dict[str, list[dict[str, Any]]]:
    """Training samples of each expert (by adapter name): its shard of the redistributed subset, or its whole cluster."""
    if expert_data == "cluster":
        return {expert_name(c, expert_data): samples for c, samples in enumerate(whole_clusters(d, k))}
    return {expert_name(c): read_samples(unit_file(d, expert_name(c))) for c in range(k)}


def check_options(o: Any, trainer: Any) -> tuple[Path, dict[str, Any]]:
    if o.mode not in MODES:
        raise PlmtoolError(f"unknown experts.mode '{o.mode}' (choose from {', '.join(MODES)})")
    check_expert_data(o.expert_data, "experts.expert_data")
    for b in o.baselines:
        if b not in BASELINES:
            raise PlmtoolError(f"unknown baseline '{b}' (choose from {', '.join(BASELINES)})")
    if o.baseline is not None and o.baseline not in BASELINES:
        raise PlmtoolError(f"unknown experts.baseline '{o.baseline}' (choose from {', '.join(BASELINES)})")
    if o.expert_index is not None and o.baseline is not None:
        raise PlmtoolError("set either experts.expert_index or experts.baseline, not both")
    if o.top_k < 1:
        raise PlmtoolError(f"experts.top_k must be >= 1, got {o.top_k}")
    if o.mode == "generate" and not o.prompt:
        raise PlmtoolError("experts.mode=generate needs experts.prompt=\"...\"")
    check_trainer(trainer)
    if trainer.epochs < 1:
        raise PlmtoolError(f"trainer.epochs must be >= 1, got {trainer.epochs}")
    d, meta = load_meta(o.redistribution)
    if o.expert_index is not None and not 0 <= o.expert_index < meta["k"]:
        raise PlmtoolError(f"experts.expert_index={o.expert_index} out of range: the redistribution has K={meta['k']} experts")
    return d, meta


def _fingerprint(unit: str, ids: list[str], o: Any, trainer: Any, model_id: str, seed: int, max_len: int, mpl: int) -> str:
    items = dict(o.lora).items() if hasattr(o.lora, "keys") else vars(o.lora).items()
    lora = {k: (list(v) if not isinstance(v, (int, float, str)) else v) for k, v in items}
    keys = ("lr", "epochs", "batch_size", "grad_accum", "max_steps", "warmup_steps", "weight_decay", "grad_clip", "precision")
    blob = json.dumps({"unit": unit, "ids": hashlib.sha1("\n".join(ids).encode()).hexdigest(), "lora": lora,
                       "trainer": {k: getattr(trainer, k, None) for k in keys}, "model": model_id, "seed": seed,
                       "max_len": max_len, "max_prompt_len": mpl,
                       # adapters initialised from the unit's own stream (unit_seed), not the process's
                       "seeding": "per-unit",
                       # labelled: each reply and its end-of-turn marker, not the newline after it
                       # (plmtool.data.chat_tokens); adapters trained with that newline are retrained
                       "labels": "reply+end-of-turn"}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def unit_seed(seed: int, unit: str) -> int:
    """The seed of unit `unit`'s random stream: a function of the run's seed and the unit's name only."""
    return (seed * 1_000_003 + zlib.crc32(unit.encode())) % 2**63


def checkpoint_path(adapters: Path, unit: str, fingerprint: str) -> Path:
    """Where unit `unit` keeps its training state until its adapter is saved."""
    return adapters / "checkpoints" / f"{unit}-{fingerprint}.pt"


def _drop_checkpoints(adapters: Path, unit: str) -> None:
    """Remove every training checkpoint of `unit` (this run's and those of settings since changed)."""
    folder = adapters / "checkpoints"
    for old in folder.glob(f"{unit}-*.pt"):
        old.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _targets(o: Any):
    t = list(o.lora.target_modules)
    return "all-linear" if t == ["all-linear"] else t


def run(o: Any, trainer: Any, run_dir: Path, seed: int, load: Callable[[], tuple[Any, Any]], model_id: str) -> dict[str, Any]:
    d, meta = check_options(o, trainer)
    k = int(meta["k"])
    adapters = Path(o.adapters_dir).expanduser() if o.adapters_dir else d / "adapters"
    max_len = int(trainer.max_seq_len)
    mpl = int(o.max_prompt_len or meta["max_prompt_len"])
    mpl = min(mpl, max_len // 2)
    experts = [expert_name(c, o.expert_data) for c in range(k)]
    units = list(o.baselines) + experts
    if o.expert_index is not None:
        jobs = [experts[o.expert_index]]
    elif o.baseline is not None:
        jobs = [o.baseline]
    elif o.mode == "all":
        jobs = units
    else:
        jobs = []
    # data of every unit (validated files written by `experts redistribute`)
    baselines = list(o.baselines) if o.mode != "generate" else []
    data = {**{u: read_samples(unit_file(d, u)) for u in baselines}, **expert_samples(d, k, o.expert_data)}
    model, tok = load()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    bf16 = resolved_precision(trainer.precision, device) == "bf16"
    cfg = lora_config(o.lora.r, o.lora.alpha, o.lora.dropout, _targets(o))
    fps = {u: _fingerprint(u, [s["id"] for s in data[u]], o, trainer, model_id, seed, max_len, mpl) for u in data}
    train_stats: dict[str, Any] = {}

    for u in data:
        path = adapters / u
        saved = adapter_meta(path)
        fresh = saved is not None and saved.get("fingerprint") == fps[u]
        if u in jobs and not fresh:
            if not data[u]:
                raise PlmtoolError(f"{u}: empty training shard")
            # the unit's own random stream (adapter initialisation, then LoRA dropout): the same
            # adapter whether the unit trains alone (a multirun / Slurm array job) or after others
            torch.manual_seed(unit_seed(seed, u))
            model = add_adapters(model, [u], cfg)
            enc = [encode(tok, s["messages"], max_len, mpl) for s in data[u]]
            # a killed job resumes mid-unit: the training state every trainer.save_every steps, in a
            # file named by the unit's fingerprint (other settings never meet this checkpoint)
            ckpt = checkpoint_path(adapters, u, fps[u])
            stats = train_adapter(model, u, enc, pad, lr=trainer.lr, epochs=trainer.epochs, batch_size=trainer.batch_size,
                                  grad_accum=trainer.grad_accum, max_steps=trainer.max_steps, weight_decay=trainer.weight_decay,
                                  warmup_steps=trainer.warmup_steps, grad_clip=trainer.grad_clip, seed=seed, bf16=bf16,
                                  log_every=trainer.log_every, checkpoint=ckpt, checkpoint_every=trainer.save_every)
            save_adapter(model, u, path, {"fingerprint": fps[u], "stats": stats})
            _drop_checkpoints(adapters, u)  # the saved adapter is the result now
            train_stats[u] = {**stats, "reused": False}
        elif fresh or (saved is not None and u not in jobs and o.mode in ("assemble", "generate")):
            # assemble / generate use what the jobs trained, whatever their settings (recorded)
            if not fresh:
                log.warning("adapter %s was trained with other settings than this run's; using it as is", u)
            model = load_adapter(model, u, path)
            if fresh:  # left by a job that died between saving the adapter and removing it
                _drop_checkpoints(adapters, u)
            train_stats[u] = {**saved["stats"], "reused": True, "settings_match": fresh}
        elif o.expert_index is None and o.baseline is None:
            why = "was trained with other settings" if saved else "is missing"
            raise PlmtoolError(f"adapter '{u}' in {adapters} {why}: train it first (mode=all, or experts.expert_index / experts.baseline jobs)")
    used = {"expert_data": o.expert_data, "expert_samples": {e: len(data[e]) for e in experts}}
    if jobs and (o.expert_index is not None or o.baseline is not None):
        return {"job": jobs[0], "adapters_dir": str(adapters), "train": train_stats, **used}

    routed = RoutedExperts(model, tok, Router.load(d / "centroids.npy"), _embedder(meta, model, tok, model_id), experts)
    if o.mode == "generate":
        out = routed.generate(o.prompt, o.max_new_tokens, o.gen_temperature, mpl)
        return {"mode": "generate", "generation": out, "k": k, "expert_data": o.expert_data}
    report = evaluate(routed, d, o, tok, pad, max_len, mpl, bf16, units)
    report.update({"k": k, "adapters_dir": str(adapters), "train": train_stats, "train_seconds": _train_seconds(train_stats, experts),
                   **used})
    if o.lm_eval_tasks:
        from plmtool.experts.lm_eval_routed import routed_lm_eval

        report["lm_eval"] = routed_lm_eval(routed, o, run_dir)
    return report


def _embedder(meta: dict[str, Any], model, tok, model_id: str):
    from plmtool.experts.embed import make_embedder

    if meta["embedder"] == "model" and meta.get("model") != model_id:
        log.warning("routing embeddings come from %s but the redistribution used %s", model_id, meta.get("model"))
    return make_embedder(meta["embedder"], model, tok, model_id=model_id, layer=meta.get("embed_layer", -1),
                         max_len=meta.get("embed_max_len", 256))


def _train_seconds(stats: dict[str, Any], experts: list[str]) -> dict[str, float]:
    out = {u: s["seconds"] for u, s in stats.items() if u not in experts}
    if all(e in stats for e in experts):
        out["routed"] = round(sum(stats[e]["seconds"] for e in experts), 3)
    return out


def evaluate(routed: RoutedExperts, d: Path, o: Any, tok, pad: int, max_len: int, mpl: int, bf16: bool, units: list[str]) -> dict[str, Any]:
    """Held-out loss (assistant tokens) of base / baselines / routed / oracle, per cluster and task."""
    held = read_samples(d / "heldout.jsonl")
    if not held:
        raise PlmtoolError(f"{d} has no held-out samples (set experts.heldout > 0 when redistributing)")
    held_emb = np.load(d / "heldout_embeddings.npy")
    router = routed.router
    routes = router.route(held_emb)
    enc = [encode(tok, s["messages"], max_len, mpl) for s in held]
    model, bs = routed.model, o.eval_batch_size
    n = len(held)
    res: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    res["base"] = encoded_losses(model, enc, pad, bs, [BASE] * n, "loss: base", bf16)
    for u in units:
        if u not in routed.names:
            res[u] = encoded_losses(model, enc, pad, bs, [u] * n, f"loss: {u}", bf16)
    k = router.k
    per_expert = None
    if o.oracle:
        per_expert = [encoded_losses(model, enc, pad, bs, [e] * n, f"loss: {e}", bf16) for e in routed.names]
        s = np.array([per_expert[int(r)][0][i] for i, r in enumerate(routes)])
        t = np.array([per_expert[int(r)][1][i] for i, r in enumerate(routes)])
        res["routed"] = (s, t)
    else:
        res["routed"] = encoded_losses(model, enc, pad, bs, [routed.names[int(r)] for r in routes], "loss: routed", bf16)
    if o.top_k > 1:
        idx, w = router.top_k(held_emb, o.top_k, o.temperature)
        lps = routed.token_logprobs(enc, routes, pad, bs, blend=(idx, w), autocast=bf16)
        res[f"routed_top{o.top_k}"] = (np.array([-lp.sum() for lp in lps]), np.array([len(lp) for lp in lps]))
    router_info: dict[str, Any] = {}
    if per_expert is not None:
        # oracle: for each held-out group (the cluster its prompt routes to), the expert with the
        # lowest loss on that group; agreement: how often the router's choice is that expert
        best = {}
        for g in range(k):
            m = routes == g
            if m.any():
                best[g] = int(np.argmin([mean_loss(*per_expert[c], m) or np.inf for c in range(k)]))
        s = np.array([per_expert[best[int(r)]][0][i] for i, r in enumerate(routes)])
        t = np.array([per_expert[best[int(r)]][1][i] for i, r in enumerate(routes)])
        res["oracle"] = (s, t)
        sample_best = np.argmin(np.stack([ps / np.maximum(pt, 1) for ps, pt in per_expert]), axis=0)
        router_info = {
            "oracle_expert_per_group": {str(g): b for g, b in best.items()},
            "agreement_group": float(np.mean([best[g] == g for g in best])),
            "agreement_samples": float(np.mean([best[int(r)] == int(r) for r in routes])),
            "agreement_per_sample_oracle": float(np.mean(sample_best == routes)),
        }
    evals = {name: mean_loss(s, t) for name, (s, t) in res.items()}
    per_cluster = {name: {str(g): mean_loss(s, t, routes == g) for g in range(k) if (routes == g).any()} for name, (s, t) in res.items()}
    report: dict[str, Any] = {"eval": evals, "eval_per_cluster": per_cluster, "heldout": n,
                              "heldout_tokens": int(res["base"][1].sum()), "heldout_per_cluster": np.bincount(routes, minlength=k).tolist()}
    tasks = np.array([str(s.get("task")) for s in held])
    if any(s.get("task") for s in held):
        report["eval_per_task"] = {name: {t: mean_loss(s, tt, tasks == t) for t in sorted(set(tasks))} for name, (s, tt) in res.items()}
    if router_info:
        report["router"] = router_info
    base = evals["base"]
    if "full" in evals and base is not None and evals["full"] is not None and base - evals["full"] > 0:
        gain = base - evals["full"]
        report["recovery_of_full_gain"] = {name: (base - v) / gain for name, v in evals.items() if name not in ("base", "full") and v is not None}
    return report
