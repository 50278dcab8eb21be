"""Evaluation of every unit of `experts train`: held-out loss and multiple-choice accuracy per task.

Results (each one adapter per sample or document):
  base                       adapters disabled
  <unit>                     a single-adapter unit (full, random, random_balanced, redistributed)
  routed / routed_cluster / routed_shared
                             the expert whose centroid is nearest to the sample's prompt (or the
                             document's own context), of each kind of experts trained
  oracle / oracle_cluster    per routed group, the expert that does best on that group: an upper
                             bound of routing, chosen on the evaluated data itself
Replicates of the 10% units (suffix `_r<r>`) are reported one by one under `replicates` and as
their mean, with the spread of the macro accuracy (`macro_sd`, `macro_min`, `macro_max`).

Held-out loss: token-weighted NLL of the assistant tokens of the held-out samples. Accuracy: the
evaluation split of each task (plmtool.data.commonsense or a file of the same records), options
scored by log-likelihood under the training prompt format (plmtool.experts.task_eval).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from plmtool.errors import PlmtoolError
from plmtool.experts.losses import encoded_losses, mean_loss
from plmtool.experts.lora import BASE
from plmtool.experts.routed import RoutedExperts, base_name, expert_name, of_kind, routed_result
from plmtool.experts.samples import read_samples
from plmtool.experts.tokenize import encode
from plmtool.io import write_json


# ----------------------------------------------------------------------------- what is evaluated


def eval_source(o: Any, meta: dict[str, Any]) -> str | None:
    """Where the evaluation documents come from (None: no accuracy evaluation)."""
    return o.eval_data or ("commonsense" if meta.get("data") == "commonsense" else None)


def check_eval(o: Any, meta: dict[str, Any], d: Path) -> tuple[str | None, list[str]]:
    """(source, tasks) of the accuracy evaluation; one clear line for what cannot work."""
    source = eval_source(o, meta)
    if o.eval_limit is not None and o.eval_limit < 1:
        raise PlmtoolError(f"experts.eval_limit must be >= 1 or null, got {o.eval_limit}")
    if source is None:
        if o.eval_tasks:
            raise PlmtoolError("experts.eval_tasks needs evaluation data: set experts.eval_data (commonsense or a .jsonl file)")
        return None, []
    pool = meta.get("tasks")
    if not pool:
        raise PlmtoolError(f"per-task evaluation needs a pool whose every record has a 'task': the pool of {d} has records "
                           "without one (evaluate without experts.eval_data, or label the records)")
    available = _available_tasks(source)
    tasks = list(o.eval_tasks) or [t for t in pool if t in available]
    for t in tasks:
        if t not in pool:
            raise PlmtoolError(f"evaluation task '{t}' is not in the pool of {d} (its tasks: {', '.join(pool)})")
        if t not in available:
            raise PlmtoolError(f"evaluation task '{t}' has no documents in {source}")
    if not tasks:
        raise PlmtoolError(f"none of the pool's tasks ({', '.join(pool)}) has documents in {source}")
    return source, tasks


def _available_tasks(source: str) -> set[str]:
    from plmtool.data import commonsense

    if source == "commonsense":
        return set(commonsense.TASKS)
    return {ex.task for ex in commonsense.read_eval(source)}


def assignments(units: dict[str, Any], routes: np.ndarray, k: int) -> dict[str, list[str]]:
    """{result: the adapter of each sample}: base, every single-adapter unit, every complete routed set."""
    out: dict[str, list[str]] = {"base": [BASE] * len(routes)}
    experts: dict[str, dict[int, str]] = {}
    for u, unit in units.items():
        if unit.cluster is None:
            out[u] = [u] * len(routes)
        else:
            experts.setdefault(routed_result(u), {})[unit.cluster] = u
    for result, by_cluster in experts.items():
        if len(by_cluster) == k:
            out[result] = [by_cluster[int(r)] for r in routes]
    return out


def _oracle_kinds(units: dict[str, Any], k: int) -> dict[str, list[str]]:
    """{oracle result: its experts by cluster} for each kind whose replicate-0 experts all exist."""
    out = {}
    for kind in ("redistributed", "cluster"):
        names = [expert_name(c, kind) for c in range(k)]
        if all(n in units for n in names):
            out[of_kind("oracle", kind)] = names
    return out


# ----------------------------------------------------------------------------- held-out loss


def heldout_loss(routed: RoutedExperts, d: Path, o: Any, units: dict[str, Any], tok, pad: int, max_len: int, mpl: int,
                 bf16: bool) -> dict[str, Any]:
    held = read_samples(d / "heldout.jsonl")
    if not held:
        return {}
    routes = routed.router.route(np.load(d / "heldout_embeddings.npy"))
    enc = [encode(tok, s["messages"], max_len, mpl) for s in held]
    model, bs, k = routed.model, o.eval_batch_size, routed.router.k
    res = {name: encoded_losses(model, enc, pad, bs, names, f"loss: {name}", bf16) for name, names in assignments(units, routes, k).items()}
    router_info: dict[str, Any] = {}
    if o.oracle:
        for oracle, names in _oracle_kinds(units, k).items():
            per_expert = [encoded_losses(model, enc, pad, bs, [e] * len(held), f"loss: {e}", bf16) for e in names]
            # per held-out group (the cluster its prompt routes to), the expert with the lowest loss there
            best = {g: int(np.argmin([mean_loss(*per_expert[c], routes == g) or np.inf for c in range(k)]))
                    for g in range(k) if (routes == g).any()}
            res[oracle] = (np.array([per_expert[best[int(r)]][0][i] for i, r in enumerate(routes)]),
                           np.array([per_expert[best[int(r)]][1][i] for i, r in enumerate(routes)]))
            sample_best = np.argmin(np.stack([ps / np.maximum(pt, 1) for ps, pt in per_expert]), axis=0)
            router_info[oracle] = {
                "oracle_expert_per_group": {str(g): b for g, b in best.items()},
                "agreement_group": float(np.mean([best[g] == g for g in best])),
                "agreement_samples": float(np.mean([best[int(r)] == int(r) for r in routes])),
                "agreement_per_sample_oracle": float(np.mean(sample_best == routes)),
            }
    if o.top_k > 1:
        idx, w = routed.router.top_k(np.load(d / "heldout_embeddings.npy"), o.top_k, o.temperature)
        lps = routed.token_logprobs(enc, routes, pad, bs, blend=(idx, w), autocast=bf16)
        res[f"routed_top{o.top_k}"] = (np.array([-lp.sum() for lp in lps]), np.array([len(lp) for lp in lps]))
    out: dict[str, Any] = {
        "loss": {name: mean_loss(s, t) for name, (s, t) in res.items()},
        "loss_per_cluster": {name: {str(g): mean_loss(s, t, routes == g) for g in range(k) if (routes == g).any()}
                             for name, (s, t) in res.items()},
        "heldout": len(held), "heldout_tokens": int(res["base"][1].sum()),
        "heldout_per_cluster": np.bincount(routes, minlength=k).tolist(),
    }
    tasks = np.array([str(s.get("task")) for s in held])
    if any(s.get("task") for s in held):
        out["loss_per_task"] = {name: {t: mean_loss(s, tt, tasks == t) for t in sorted(set(tasks))} for name, (s, tt) in res.items()}
    if router_info:
        out["router"] = router_info
    return out


# ----------------------------------------------------------------------------- accuracy per task


def task_accuracy(routed: RoutedExperts, meta: dict[str, Any], o: Any, units: dict[str, Any], tok, mpl: int, seed: int,
                  run_dir: Path, d: Path) -> dict[str, Any]:
    from plmtool.data.commonsense import eval_examples
    from plmtool.experts.task_eval import score_units, subsample, summarize, task_requests

    source, tasks = check_eval(o, meta, d)
    if source is None:
        return {}
    found = eval_examples(source, tasks)
    items, docs = [], []
    for t in tasks:
        every = [ex for ex in found if ex.task == t]
        picked = subsample(every, o.eval_limit, seed)
        items.append(task_requests(t, picked, len(every), tok, mpl))
        docs += picked
    # each document is routed by its own context (the first option's, for tasks whose options differ in context)
    routes = routed.route([ex.contexts[0] for ex in docs])
    k = routed.router.k
    plan = assignments(units, routes, k)
    oracles = _oracle_kinds(units, k) if o.oracle else {}
    for names in oracles.values():  # every expert on every document (scored once, shared with the routed results)
        plan.update({f"__all_{e}": [e] * len(docs) for e in names})
    scores = score_units(routed.model, tok, items, plan, batch_size=o.eval_batch_size)
    results = {name: summarize(items, scores[name]) for name in plan if not name.startswith("__all_")}
    router_info: dict[str, Any] = {}
    for oracle, names in oracles.items():
        correct = np.stack([_correct(items, scores[f"__all_{e}"]) for e in names])  # [experts, documents]
        best = {g: int(np.argmax(correct[:, routes == g].mean(1))) for g in range(k) if (routes == g).any()}
        chosen = [names[best[int(r)]] for r in routes]
        flat = {e: _flat(scores[f"__all_{e}"]) for e in names}
        per_doc = _split([flat[a][i] for i, a in enumerate(chosen)], items)
        results[oracle] = summarize(items, per_doc)
        router_info[oracle] = {"oracle_expert_per_group": {str(g): b for g, b in best.items()},
                               "agreement_group": float(np.mean([best[g] == g for g in best]))}
    write_json(run_dir / "task_accuracy.json", {name: r["detail"] for name, r in results.items()})
    docs_per_task = {item.task: len(item.docs) for item in items}
    return {"results": {n: {k_: v for k_, v in r.items() if k_ != "detail"} for n, r in results.items()},
            "source": source, "docs": docs_per_task, "total_docs": {item.task: item.total_docs for item in items},
            "routes_per_task": {t: np.bincount(routes[[i for i, ex in enumerate(docs) if ex.task == t]], minlength=k).tolist()
                                for t in tasks},
            "router": router_info}


def _flat(per_task: list[list]) -> list:
    return [doc for task in per_task for doc in task]


def _split(flat: list, items: list) -> list[list]:
    out, pos = [], 0
    for item in items:
        out.append(flat[pos : pos + len(item.docs)])
        pos += len(item.docs)
    return out


def _correct(items: list, per_task: list[list]) -> np.ndarray:
    """1 where the highest log-likelihood option is gold, per document (tasks concatenated)."""
    out = []
    for item, docs in zip(items, per_task):
        for doc, res in zip(item.docs, docs):
            ll = [r[0] for r in res]
            out.append(1.0 if int(np.argmax(ll)) in doc.gold else 0.0)
    return np.array(out)


# ----------------------------------------------------------------------------- one report


def evaluate(routed: RoutedExperts, d: Path, meta: dict[str, Any], o: Any, units: dict[str, Any], tok, pad: int, max_len: int,
             mpl: int, bf16: bool, run_dir: Path, seed: int = 0) -> dict[str, Any]:
    """`eval.<result>`: {loss, macro, worst, worst_task, tasks} (replicated results: their mean, spread and replicates)."""
    loss = heldout_loss(routed, d, o, units, tok, pad, max_len, mpl, bf16)
    acc = task_accuracy(routed, meta, o, units, tok, mpl, seed, Path(run_dir), d)
    if not loss and not acc:
        raise PlmtoolError(f"{d} has no held-out samples and no evaluation tasks: nothing to evaluate "
                           "(set experts.heldout > 0 when redistributing, or experts.eval_data)")
    per_result: dict[str, dict[str, Any]] = {}
    for name in list(loss.get("loss", {})) + [n for n in acc.get("results", {}) if n not in loss.get("loss", {})]:
        entry: dict[str, Any] = {}
        if name in loss.get("loss", {}):
            entry["loss"] = loss["loss"][name]
        if name in acc.get("results", {}):
            entry.update(acc["results"][name])
        per_result[name] = entry
    report: dict[str, Any] = {"eval": aggregate(per_result)}
    report.update({k: v for k, v in loss.items() if k != "loss"})
    if acc:
        report["accuracy"] = {k: v for k, v in acc.items() if k != "results"}
        report["accuracy"]["metric"] = "acc: the option with the highest log-likelihood is gold"
    report.update(gains(report["eval"]))
    return report


def aggregate(per_result: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Replicates `<name>_r<r>` folded into `<name>`: the mean of each number, the macro spread, the replicates."""
    groups: dict[str, list[str]] = {}
    for name in per_result:
        groups.setdefault(base_name(name)[0], []).append(name)
    out: dict[str, dict[str, Any]] = {}
    for name, members in groups.items():
        entries = [per_result[m] for m in members]
        if len(entries) == 1:
            out[name] = entries[0]
            continue
        mean: dict[str, Any] = {}
        for key in ("loss", "macro", "worst"):
            values = [e[key] for e in entries if e.get(key) is not None]
            if values:
                mean[key] = float(np.mean(values))
        if all("tasks" in e for e in entries):
            mean["tasks"] = {t: float(np.mean([e["tasks"][t] for e in entries])) for t in entries[0]["tasks"]}
            mean["worst_task"] = min(mean["tasks"], key=mean["tasks"].get)
            macros = [e["macro"] for e in entries]
            mean.update(macro_sd=float(np.std(macros, ddof=1)), macro_min=min(macros), macro_max=max(macros),
                        worst_sd=float(np.std([e["worst"] for e in entries], ddof=1)))
        mean["replicates"] = {m: per_result[m] for m in members}
        out[name] = mean
    return out


def gains(ev: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Share of the full-data unit's improvement over base that each result reaches (loss and macro accuracy)."""
    out: dict[str, Any] = {}
    base, full = ev.get("base", {}), ev.get("full", {})
    if base.get("loss") is not None and full.get("loss") is not None and base["loss"] - full["loss"] > 0:
        gain = base["loss"] - full["loss"]
        out["recovery_of_full_gain"] = {n: (base["loss"] - e["loss"]) / gain for n, e in ev.items()
                                        if n not in ("base", "full") and e.get("loss") is not None}
    if base.get("macro") is not None and full.get("macro") is not None and not math.isclose(full["macro"], base["macro"]):
        gain = full["macro"] - base["macro"]
        out["share_of_full_accuracy_gain"] = {n: (e["macro"] - base["macro"]) / gain for n, e in ev.items()
                                              if n not in ("base", "full") and e.get("macro") is not None}
    return out
