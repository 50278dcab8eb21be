"""Orchestration of `plmtool experts train` (no hydra: usable from scripts).

Units (each one LoRA adapter, trained for the same number of epochs over its own data, i.e. the
same budget per sample):
  full             the whole pool (100%)
  random           a uniform random subset of the redistributed size
  random_balanced  a random subset of that size with an equal share per task (task-labelled pools)
  redistributed    the redistributed subset (one adapter over all clusters)
  expert_<k>       cluster k's share of the redistributed subset (routed by nearest centroid)
  expert_<k>_cluster
                   with experts.expert_data=cluster (or both): every pool sample of cluster k, so
                   the experts together see the whole pool, as `full` does
  shared_<k>       with experts.shared_experts: the redistributed adapter (frozen) plus a small
                   LoRA of its own trained on cluster k's share, saved as one adapter
The 10% units (random, random_balanced, redistributed and the experts and shared experts built on
the redistributed shares) exist once per replicate of the redistribution: replicate r > 0 adds
the suffix `_r<r>` and reads `replicates/<r>/` (its own draw of the subsets, seed + r).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from plmtool.errors import PlmtoolError
from plmtool.experts.lora import adapter_meta, add_adapters, concat_adapters, load_adapter, lora_config, save_adapter, train_adapter
from plmtool.experts.routed import EXPERT_DATA, RoutedExperts, base_name, expert_name, replica, routed_result
from plmtool.experts.run_redistribute import load_meta, replicate_dir
from plmtool.experts.router import Router
from plmtool.experts.samples import read_samples
from plmtool.experts.tokenize import encode
from plmtool.train_config import check_trainer
from plmtool.train_loop import resolved_precision

log = logging.getLogger("plmtool")
BASELINES = ("full", "random", "random_balanced", "redistributed")
REPLICATED = ("random", "random_balanced", "redistributed")  # the budgeted units: one per replicate
MODES = ("all", "assemble", "generate")
UNIT_FILES = {"full": "samples.jsonl", "random": "random.jsonl", "random_balanced": "random_balanced.jsonl",
              "redistributed": "selected.jsonl"}


def unit_file(d: Path, unit: str) -> Path:
    name, r = base_name(unit)
    return replicate_dir(d, r) / (UNIT_FILES[name] if name in UNIT_FILES else f"shards/{name}.jsonl")


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


def expert_kinds(expert_data: str) -> tuple[str, ...]:
    return EXPERT_DATA if expert_data == "both" else (expert_data,)


@dataclass
class Unit:
    name: str
    samples: list[dict[str, Any]]
    cluster: int | None = None  # experts and shared experts: the cluster they serve
    under: str | None = None  # shared experts: the frozen adapter beneath their own part


def plan(d: Path, meta: dict[str, Any], o: Any) -> dict[str, Unit]:
    """Every unit of the run with its training samples (validated files written by `experts redistribute`)."""
    k, reps = int(meta["k"]), int(meta.get("replicates", 1))
    units: dict[str, Unit] = {}
    for b in o.baselines:
        if b == "random_balanced" and not meta.get("tasks"):
            continue  # a pool without task labels has no task shares to balance (the report says so)
        for r in range(reps if b in REPLICATED else 1):
            u = replica(b, r)
            units[u] = Unit(u, read_samples(unit_file(d, u)))
    for kind in expert_kinds(o.expert_data):
        if kind == "cluster":
            for c, samples in enumerate(whole_clusters(d, k)):
                units[expert_name(c, kind)] = Unit(expert_name(c, kind), samples, c)
            continue
        for r in range(reps):
            for c in range(k):
                u = replica(expert_name(c), r)
                units[u] = Unit(u, read_samples(unit_file(d, u)), c)
    if o.shared_experts:
        for r in range(reps):
            for c in range(k):
                u = replica(f"shared_{c}", r)
                units[u] = Unit(u, units[replica(expert_name(c), r)].samples, c, under=replica("redistributed", r))
    return units


def check_options(o: Any, trainer: Any) -> tuple[Path, dict[str, Any]]:
    if o.mode not in MODES:
        raise PlmtoolError(f"unknown experts.mode '{o.mode}' (choose from {', '.join(MODES)})")
    if o.expert_data not in (*EXPERT_DATA, "both"):
        raise PlmtoolError(f"unknown experts.expert_data '{o.expert_data}' (choose from {', '.join(EXPERT_DATA)}, both)")
    if o.shared_experts and ("redistributed" not in o.baselines or o.expert_data == "cluster"):
        raise PlmtoolError("experts.shared_experts builds on the redistributed unit and its shards: keep 'redistributed' in "
                           "experts.baselines and experts.expert_data redistributed or both")
    if o.shared_r < 1:
        raise PlmtoolError(f"experts.shared_r must be >= 1, got {o.shared_r}")
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
    from plmtool.experts.evaluate import check_eval

    check_eval(o, meta, d)  # the evaluation tasks, before any training
    return d, meta


def _fingerprint(unit: str, ids: list[str], o: Any, trainer: Any, model_id: str, seed: int, max_len: int, mpl: int,
                 under: str = "") -> str:
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
                       "labels": "reply+end-of-turn",
                       **({"under": under, "shared_r": o.shared_r} if under else {})}, sort_keys=True, default=str)
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


def jobs_of(o: Any, units: dict[str, Unit]) -> list[str]:
    """The units this run trains: one expert index (every kind and replicate of that cluster), one
    baseline (every replicate), everything (mode=all) or nothing (assemble / generate)."""
    if o.expert_index is not None:
        return [u for u, unit in units.items() if unit.cluster == o.expert_index]
    if o.baseline is not None:
        return [u for u in units if base_name(u)[0] == o.baseline]
    return list(units) if o.mode == "all" else []


def run(o: Any, trainer: Any, run_dir: Path, seed: int, load: Callable[[], tuple[Any, Any]], model_id: str) -> dict[str, Any]:
    d, meta = check_options(o, trainer)
    k = int(meta["k"])
    adapters = Path(o.adapters_dir).expanduser() if o.adapters_dir else d / "adapters"
    max_len = int(trainer.max_seq_len)
    mpl = int(o.max_prompt_len or meta["max_prompt_len"])
    mpl = min(mpl, max_len // 2)
    units = plan(d, meta, o)
    if o.mode == "generate":  # only the experts route a prompt
        units = {u: unit for u, unit in units.items() if unit.cluster is not None and unit.under is None}
    jobs = jobs_of(o, units)
    model, tok = load()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    device = next(model.parameters()).device
    bf16 = resolved_precision(trainer.precision, device) == "bf16"
    cfg = lora_config(o.lora.r, o.lora.alpha, o.lora.dropout, _targets(o))
    fps: dict[str, str] = {}
    for u, unit in units.items():  # a shared expert's fingerprint holds the one of the adapter beneath it
        extra = fps.get(unit.under, "") if unit.under else ""
        fps[u] = _fingerprint(u, [s["id"] for s in unit.samples], o, trainer, model_id, seed, max_len, mpl, extra)
    train_stats: dict[str, Any] = {}

    for u, unit in units.items():
        path = adapters / u
        saved = adapter_meta(path)
        fresh = saved is not None and saved.get("fingerprint") == fps[u]
        if u in jobs and not fresh:
            if not unit.samples:
                raise PlmtoolError(f"{u}: empty training shard")
            if unit.under is not None and unit.under not in getattr(model, "peft_config", {}):
                if adapter_meta(adapters / unit.under) is None:
                    raise PlmtoolError(f"{u} trains on top of '{unit.under}', which is not trained yet in {adapters}")
                model = load_adapter(model, unit.under, adapters / unit.under)
            # the unit's own random stream (adapter initialisation, then LoRA dropout): the same
            # adapter whether the unit trains alone (a multirun / Slurm array job) or after others
            torch.manual_seed(unit_seed(seed, u))
            own = u if unit.under is None else f"{u}_own"
            own_cfg = cfg if unit.under is None else lora_config(o.shared_r, 2 * o.shared_r, o.lora.dropout, _targets(o))
            model = add_adapters(model, [own], own_cfg)
            enc = [encode(tok, s["messages"], max_len, mpl) for s in unit.samples]
            # a killed job resumes mid-unit: the training state every trainer.save_every steps, in a
            # file named by the unit's fingerprint (other settings never meet this checkpoint)
            ckpt = checkpoint_path(adapters, u, fps[u])
            stats = train_adapter(model, own, enc, pad, lr=trainer.lr, epochs=trainer.epochs, batch_size=trainer.batch_size,
                                  grad_accum=trainer.grad_accum, max_steps=trainer.max_steps, weight_decay=trainer.weight_decay,
                                  warmup_steps=trainer.warmup_steps, grad_clip=trainer.grad_clip, seed=seed, bf16=bf16,
                                  log_every=trainer.log_every, checkpoint=ckpt, checkpoint_every=trainer.save_every,
                                  under=unit.under)
            if unit.under is not None:  # the frozen adapter and the own part as one adapter
                concat_adapters(model, u, [unit.under, own], o.lora.dropout)
                model.delete_adapter(own)
            save_adapter(model, u, path, {"fingerprint": fps[u], "stats": stats})
            _drop_checkpoints(adapters, u)  # the saved adapter is the result now
            train_stats[u] = {**stats, "reused": False}
        elif fresh or (saved is not None and u not in jobs and o.mode in ("assemble", "generate")):
            # assemble / generate use what the jobs trained, whatever their settings (recorded)
            if not fresh:
                log.warning("adapter %s was trained with other settings than this run's; using it as is", u)
            if u not in getattr(model, "peft_config", {}):
                model = load_adapter(model, u, path)
            if fresh:  # left by a job that died between saving the adapter and removing it
                _drop_checkpoints(adapters, u)
            train_stats[u] = {**saved["stats"], "reused": True, "settings_match": fresh}
        elif o.expert_index is None and o.baseline is None:
            why = "was trained with other settings" if saved else "is missing"
            raise PlmtoolError(f"adapter '{u}' in {adapters} {why}: train it first (mode=all, or experts.expert_index / experts.baseline jobs)")
    experts = [u for u, unit in units.items() if unit.cluster is not None]
    not_applicable = {"random_balanced": "the pool's samples have no task labels"} \
        if "random_balanced" in o.baselines and not meta.get("tasks") else {}
    used = {"expert_data": o.expert_data, "not_applicable": not_applicable, "expert_samples": {e: len(units[e].samples) for e in experts},
            "unit_samples": {u: len(unit.samples) for u, unit in units.items()}}
    if jobs and (o.expert_index is not None or o.baseline is not None):
        return {"job": o.baseline if o.baseline is not None else expert_name(o.expert_index), "jobs": jobs,
                "adapters_dir": str(adapters), "train": train_stats, **used}

    first_kind = expert_kinds(o.expert_data)[0]
    routed = RoutedExperts(model, tok, Router.load(d / "centroids.npy"), _embedder(meta, model, tok, model_id),
                           [expert_name(c, first_kind) for c in range(k)])
    if o.mode == "generate":
        out = routed.generate(o.prompt, o.max_new_tokens, o.gen_temperature, mpl)
        return {"mode": "generate", "generation": out, "k": k, "expert_data": o.expert_data}
    from plmtool.experts.evaluate import evaluate

    report = evaluate(routed, d, meta, o, units, tok, pad, max_len, mpl, bf16, run_dir, seed)
    report.update({"k": k, "replicates": int(meta.get("replicates", 1)), "adapters_dir": str(adapters), "train": train_stats,
                   "train_seconds": _train_seconds(train_stats, units), **used})
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


def _train_seconds(stats: dict[str, Any], units: dict[str, Unit]) -> dict[str, float]:
    """Training seconds of every single-adapter unit, and of each routed set of experts together."""
    out: dict[str, float] = {u: stats[u]["seconds"] for u, unit in units.items() if unit.cluster is None and u in stats}
    groups: dict[str, list[str]] = {}
    for u, unit in units.items():
        if unit.cluster is not None:
            groups.setdefault(routed_result(u), []).append(u)
    for name, members in groups.items():
        if all(m in stats for m in members):
            out[name] = round(sum(stats[m]["seconds"] for m in members), 3)
    return out
