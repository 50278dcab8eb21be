"""Zero-shot requests rendered by lm-eval's own task configs, kept as plain data.

lm-eval renders each document of a task into loglikelihood requests (context, continuation) and
knows its gold answer. We let it do exactly that (`build_all_requests`, `doc_to_choice`,
`doc_to_target` / `doc_to_text` for multiple-input tasks such as WinoGrande), then keep the result
as plain data: per document its requests, its gold index (or indices) and the character length of
each choice (lm-eval's `acc_norm` divides by it). The data is cached as JSON, so scoring later needs
neither lm-eval nor datasets (e.g. on a GPU machine that has neither).

Metrics follow lm-eval's `process_results`: multiple choice -> `acc` (argmax of log-likelihoods is
gold) and `acc_norm` (argmax of log-likelihood per character), reported where the task's
metric_list names them; loglikelihood tasks -> `acc` (the continuation is greedy) and
`perplexity` (exp of minus the mean log-likelihood).
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from plmtool.errors import PlmtoolError
from plmtool.io import atomic_write, read_json, write_json

FORMAT_VERSION = 1
SUPPORTED = ("multiple_choice", "loglikelihood")
MC_METRICS = ("acc", "acc_norm")


@dataclass
class Doc:
    requests: list[tuple[str, str]]
    gold: list[int]  # one index, or several for multiple-target tasks
    choice_chars: list[int] = field(default_factory=list)  # multiple choice: len(choice) per choice


@dataclass
class TaskRequests:
    task: str
    source: str  # "local" (embedded copy), "hub" (lm-eval's hub task) or "include" (a user task dir)
    output_type: str
    metrics: list[str]
    total_docs: int  # documents in the evaluated split
    docs: list[Doc]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TaskRequests":
        docs = [Doc([tuple(r) for r in d["requests"]], list(d["gold"]), list(d["choice_chars"])) for d in obj["docs"]]
        fields = {k: obj[k] for k in ("task", "source", "output_type", "metrics", "total_docs")}
        return cls(**fields, docs=docs)


def save(items: list[TaskRequests], path: str | Path) -> Path:
    """JSON, gzip-compressed when the name ends in .gz (full task sets are tens of MB)."""
    data = [t.to_json() for t in items]
    if not str(path).endswith(".gz"):
        return write_json(path, data)

    def _write(tmp: str) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8") as fh:
            json.dump(data, fh)

    return atomic_write(path, _write)


def load(path: str | Path) -> list[TaskRequests]:
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                data = json.load(fh)
        else:
            data = read_json(path)
    except (OSError, ValueError) as e:
        raise PlmtoolError(f"{path}: cannot read zero-shot requests ({type(e).__name__}: {e})") from None
    if not isinstance(data, list) or any(d.get("format") != FORMAT_VERSION for d in data):
        raise PlmtoolError(f"{path}: not a plmtool request file of format {FORMAT_VERSION}")
    return [TaskRequests.from_json(d) for d in data]


def _gold(task, doc: dict, choices: list[str]) -> list[int]:
    # lm-eval's process_results: multiple-input tasks keep the gold in doc_to_text.
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    golds = gold if isinstance(gold, list) else [gold]
    out = []
    for g in golds:
        if isinstance(g, str):
            g = choices.index(g) if g in choices else -100
        out.append(int(g) if int(g) < len(choices) else -100)
    return out


def from_lm_eval_task(name: str, task, source: str, limit: int | None) -> TaskRequests:
    """Render the first `limit` documents of an lm-eval task object into requests."""
    if task.OUTPUT_TYPE not in SUPPORTED:
        raise PlmtoolError(
            f"zero-shot task {name} is a {task.OUTPUT_TYPE} task; plmtool scores {' and '.join(SUPPORTED)} tasks"
        )
    total = len(task.eval_docs)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    docs: list[Doc] = []
    for doc_id in sorted(by_doc):
        insts = sorted(by_doc[doc_id], key=lambda i: i.idx)
        doc = insts[0].doc
        reqs = [tuple(i.args[:2]) for i in insts]
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            if len(reqs) != len(choices):
                raise PlmtoolError(f"zero-shot task {name}: document {doc_id} has {len(reqs)} requests for {len(choices)} choices")
            docs.append(Doc(reqs, _gold(task, doc, choices), [len(c) for c in choices]))
        else:
            docs.append(Doc(reqs, [0]))
    reported = list(getattr(task, "_metric_fn_list", {}).keys())
    if task.OUTPUT_TYPE == "multiple_choice":
        metrics = [m for m in MC_METRICS if m in reported] or ["acc"]
    else:
        metrics = ["acc", "perplexity"]
    return TaskRequests(name, source, task.OUTPUT_TYPE, metrics, total, docs)


def _argmax(values: list[float]) -> int:
    # numpy's argmax: the first maximum wins
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def metrics(task: TaskRequests, results: list[list[tuple[float, bool]]]) -> dict[str, Any]:
    """lm-eval's per-document metrics, averaged, with the standard error of each mean."""
    per_doc: dict[str, list[float]] = {m: [] for m in task.metrics if m != "perplexity"}
    lls: list[float] = []
    for doc, res in zip(task.docs, results):
        ll = [r[0] for r in res]
        if task.output_type == "multiple_choice":
            pred = _argmax(ll)
            pred_norm = _argmax([v / max(c, 1) for v, c in zip(ll, doc.choice_chars)])
            if "acc" in per_doc:
                per_doc["acc"].append(1.0 if pred in doc.gold else 0.0)
            if "acc_norm" in per_doc:
                per_doc["acc_norm"].append(1.0 if pred_norm in doc.gold else 0.0)
        else:
            per_doc["acc"].append(1.0 if res[0][1] else 0.0)
            lls.append(ll[0])
    out: dict[str, Any] = {"n": len(task.docs), "total_docs": task.total_docs, "source": task.source}
    for name, values in per_doc.items():
        n = len(values)
        mean = sum(values) / n if n else float("nan")
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
        out[name] = mean
        out[f"{name}_stderr"] = math.sqrt(var / n) if n > 1 else float("nan")
    if lls:
        out["perplexity"] = math.exp(-sum(lls) / len(lls))
    return out
