"""lm-eval tasks with routing applied per example (optional: `experts.lm_eval_tasks`).

lm-eval's HFLM scores each request in `_model_call`; the subclass below decodes every row of the
batch, routes it (nearest centroid of its embedding) and runs the batch with one adapter per row
(peft mixed-batch inference). A row is the scored sequence (context + continuation): the choice
made here, since `_model_call` does not see where the context ends - the continuation is short
next to the context in multiple-choice tasks, so it rarely changes the route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plmtool.experts.lora import BASE


def _lm_class():
    from lm_eval.models.huggingface import HFLM

    class AdapterPerRowLM(HFLM):
        """HFLM whose forward picks an adapter per row: `pick(token_rows) -> [adapter name]`."""

        def __init__(self, *args, pick=None, **kwargs):
            super().__init__(*args, **kwargs)
            self._pick = pick

        def _model_call(self, inps, attn_mask=None, labels=None):
            import torch

            with torch.no_grad():
                names = self._pick(inps)
                return self.model(inps, adapter_names=names).logits

    return AdapterPerRowLM


def routed_lm_eval(routed, o: Any, run_dir: str | Path) -> dict[str, dict[str, float]]:
    """{"base" | "full" | "redistributed" | "routed": {task: acc}} on the tasks of o.lm_eval_tasks."""
    from lm_eval import simple_evaluate

    from plmtool.eval.zeroshot import _check_include_path, check_task_names, expand_tasks, task_manager, write_results

    tasks = expand_tasks(list(o.lm_eval_tasks))
    check_task_names(tasks, o.lm_eval_include_path)
    from plmtool.eval.offline_task import TASK_NAME as OFFLINE_TASK

    user = _check_include_path(o.lm_eval_include_path)
    paths = [user] if user else []
    if OFFLINE_TASK in tasks:
        from plmtool.eval.offline_task import offline_task_dir

        paths.append(offline_task_dir(100, 4, 0, None))
    tm = task_manager(paths, include_defaults=any(t != OFFLINE_TASK for t in tasks))
    tok, model = routed.tokenizer, routed.model
    pad = tok.pad_token_id

    def route_rows(inps):
        texts = [tok.decode([t for t in row.tolist() if t != pad]) for row in inps]
        return [routed.names[int(r)] for r in routed.route(texts)]

    pickers = {"base": lambda inps: [BASE] * len(inps), "routed": route_rows}
    for fixed in ("full", "redistributed"):
        if fixed in model.peft_config:
            pickers[fixed] = lambda inps, f=fixed: [f] * len(inps)
    out: dict[str, dict[str, float]] = {}
    cls = _lm_class()
    for name, pick in pickers.items():
        lm = cls(pretrained=model, tokenizer=tok, batch_size=o.eval_batch_size, pick=pick)
        res = simple_evaluate(model=lm, tasks=tasks, limit=o.lm_eval_limit, task_manager=tm, log_samples=False)
        write_results(res, Path(run_dir) / f"lm_eval_{name}.json")
        out[name] = {t: float(e.get("acc,none", e.get("acc", float("nan")))) for t, e in res.get("results", {}).items()}
    return out
