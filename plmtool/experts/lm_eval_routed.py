"""Zero-shot tasks scored per unit, with routing applied per document (optional:
`experts.lm_eval_tasks`).

The requests come from `plmtool.eval.zeroshot` (lm-eval renders them; the embedded copies of the
standard tasks offline). Each unit scores every document with one adapter: the base model, the
full-data or redistributed LoRA, or - for `routed` - the expert whose centroid is nearest to the
document's own context (the text before the first choice), so a document's choices are always
compared under the same expert.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from plmtool.io import write_json


def routed_lm_eval(routed, o: Any, run_dir: str | Path) -> dict[str, dict[str, float]]:
    """{"base" | "full" | "redistributed" | "routed": {task: acc}} on the tasks of o.lm_eval_tasks."""
    from plmtool.eval.requests import metrics
    from plmtool.eval.zeroshot import build_requests, doc_scores, expand_tasks, resolve

    tasks = expand_tasks(list(o.lm_eval_tasks))
    sources = resolve(tasks, "auto", o.lm_eval_include_path)
    items = build_requests(tasks, sources, o.lm_eval_limit, 0, o.lm_eval_include_path,
                           generated={"size": 100, "choices": 4, "seed": 0, "data_cfg": None})
    model, tok = routed.model, routed.tokenizer
    units = ["base", *[u for u in ("full", "redistributed") if u in model.peft_config], "routed"]
    contexts = [doc.requests[0][0] for item in items for doc in item.docs]
    routes = [routed.names[int(r)] for r in routed.route(contexts)] if contexts else []
    out: dict[str, dict[str, float]] = {}
    for unit in units:
        adapter_of = routes if unit == "routed" else [unit] * len(contexts)
        per_doc: list[list] = [[None] * len(item.docs) for item in items]
        for adapter in sorted(set(adapter_of)):
            # the documents this adapter scores, as task subsets in the original order
            picked, flat = [], 0
            for t, item in enumerate(items):
                keep = [d for d in range(len(item.docs)) if adapter_of[flat + d] == adapter]
                picked.append(keep)
                flat += len(item.docs)
            subset = [replace(item, docs=[item.docs[d] for d in keep]) for item, keep in zip(items, picked)]
            if adapter == "base":
                with model.disable_adapter():
                    res = doc_scores(model, tok, subset, batch_size=o.eval_batch_size)
            else:
                model.set_adapter(adapter)
                res = doc_scores(model, tok, subset, batch_size=o.eval_batch_size)
            for t, keep in enumerate(picked):
                for d, r in zip(keep, res[t]):
                    per_doc[t][d] = r
        detail = {item.task: metrics(item, per_doc[t]) for t, item in enumerate(items)}
        write_json(Path(run_dir) / f"zeroshot_{unit}.json", detail)
        out[unit] = {task: m["acc"] for task, m in detail.items()}
    return out
