"""Multiple-choice accuracy per task for every unit, each document scored under its own adapter.

A unit assigns one adapter to each document: the base model (`BASE`, adapters disabled), one
LoRA for all (full, random, redistributed), or, for routed units, the expert its own context is
routed to, so that a document's options are always compared under the same adapter. Scoring is
`plmtool.eval`'s (lm-eval's loglikelihood rules); documents are grouped by adapter so each adapter
is switched on once per unit.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import replace
from typing import Any, Sequence

from plmtool.eval.requests import Doc, TaskRequests, metrics
from plmtool.eval.zeroshot import doc_scores
from plmtool.experts.lora import BASE



def task_requests(task: str, examples: Sequence[Any], total: int, tokenizer, max_prompt_len: int | None = None) -> TaskRequests:
    """Commonsense `Example`s (plmtool.data.commonsense) as a multiple-choice task, rendered as the
    experts train on them: each context is the user turn of a chat (cut to `max_prompt_len` tokens
    as in training), each continuation the assistant's reply."""
    from plmtool.data.chat_tokens import cut_tokens, render_prompt

    def prompt(context: str) -> str:
        if max_prompt_len:
            context = cut_tokens(tokenizer, context, max_prompt_len)
        return render_prompt(tokenizer, [{"role": "user", "content": context}])

    docs = []
    for e in examples:
        rendered = {c: prompt(c) for c in dict.fromkeys(e.contexts)}
        replies = [c.strip() for c in e.continuations]
        docs.append(Doc([(rendered[c], r) for c, r in zip(e.contexts, replies)], [e.gold], [len(r) for r in replies]))
    return TaskRequests(task, "local", "multiple_choice", ["acc", "acc_norm"], total, docs)


def subsample(items: list, limit: int | None, seed: int) -> list:
    """A seeded subsample of at most `limit` items, in their original order (None = all)."""
    if limit is None or len(items) <= limit:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def score_units(model, tokenizer, items: list[TaskRequests], assignments: dict[str, Sequence[str]],
                batch_size: int = 32) -> dict[str, list[list[list[tuple[float, bool]]]]]:
    """{unit: per task, per document, the (log-likelihood, greedy) of each request}.

    `assignments[unit]` names the adapter of every document, tasks concatenated in order. A
    document is scored once per adapter, however many units apply that adapter to it.
    """
    sizes = [len(item.docs) for item in items]
    starts = [sum(sizes[:t]) for t in range(len(sizes))]
    scored: dict[str, dict[int, list]] = {}  # adapter -> flat document index -> its results
    out: dict[str, list] = {}
    for unit, adapter_of in assignments.items():
        if len(adapter_of) != sum(sizes):
            raise ValueError(f"unit {unit}: {len(adapter_of)} adapters for {sum(sizes)} documents")
        for adapter in dict.fromkeys(adapter_of):
            done = scored.setdefault(adapter, {})
            todo = [i for i, a in enumerate(adapter_of) if a == adapter and i not in done]
            if not todo:
                continue
            # the documents to score, as task subsets in their original order
            subset = [replace(item, docs=[item.docs[i - s] for i in todo if s <= i < s + n])
                      for item, s, n in zip(items, starts, sizes)]
            with _activate(model, adapter):
                per_task = doc_scores(model, tokenizer, subset, batch_size=batch_size)
            done.update(zip(todo, (r for task in per_task for r in task)))
        flat = [scored[a][i] for i, a in enumerate(adapter_of)]
        out[unit] = [flat[s : s + n] for s, n in zip(starts, sizes)]
    return out


def _activate(model, adapter: str):
    if adapter == BASE:
        return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    model.set_adapter(adapter)
    return contextlib.nullcontext()


def summarize(items: list[TaskRequests], results: list[list[list[tuple[float, bool]]]], metric: str = "acc") -> dict[str, Any]:
    """{"macro", "worst", "worst_task", "tasks": {task: acc}, "detail": {task: all metrics}}."""
    detail = {item.task: metrics(item, res) for item, res in zip(items, results)}
    tasks = {t: m[metric] for t, m in detail.items()}
    worst = min(tasks, key=lambda t: tasks[t]) if tasks else None
    macro = sum(tasks.values()) / len(tasks) if tasks else math.nan
    return {"macro": macro, "worst": tasks[worst] if worst else math.nan, "worst_task": worst, "tasks": tasks, "detail": detail}
