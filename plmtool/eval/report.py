"""Markdown tables of evaluation results, shared by every command that evaluates a model."""

from __future__ import annotations

from typing import Any

from plmtool.markdown import md_table


def subset_note(result: dict[str, Any]) -> str:
    """How many documents each zero-shot number rests on (a subset must say so)."""
    tasks = result.get("zeroshot_tasks") or {}
    if not tasks:
        return ""
    parts = [f"{t} {m['n']}/{m['total_docs']}" for t, m in tasks.items()]
    whole = all(m["n"] == m["total_docs"] for m in tasks.values())
    lead = "full evaluation sets" if whole else f"first {result.get('zeroshot_limit')} documents per task (subset)"
    sources = sorted({m["source"] for m in tasks.values()})
    return f"Zero-shot: {lead}; documents scored: {', '.join(parts)}; data: {', '.join(sources)}."


def metrics_table(result: dict[str, Any]) -> str:
    """Perplexity and every zero-shot task (acc, acc_norm where reported), then their average."""
    rows: list[list[Any]] = []
    if result.get("ppl") is not None:
        rows.append([f"perplexity ({result['corpus']}, seqlen {result['seqlen']}, {result['ppl_tokens']} tokens)", result["ppl"], ""])
    for task, m in (result.get("zeroshot_tasks") or {}).items():
        rows.append([f"{task} acc", m.get("acc"), f"± {m['acc_stderr']:.3f}" if m.get("acc_stderr") == m.get("acc_stderr") else ""])
        if "acc_norm" in m:
            rows.append([f"{task} acc_norm", m["acc_norm"], f"± {m['acc_norm_stderr']:.3f}"])
    if result.get("zeroshot_avg") is not None:
        rows.append([f"average acc ({len(result['zeroshot'])} tasks)", result["zeroshot_avg"], ""])
    for task, reason in (result.get("zeroshot_unavailable") or {}).items():
        rows.append([f"{task}", "unavailable", reason])
    text = md_table(["metric", "value", "stderr / note"], rows)
    note = subset_note(result)
    return text + ("\n\n" + note if note else "")
