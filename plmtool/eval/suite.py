"""One call that every command uses to score a model: perplexity + zero-shot accuracy.

    evaluate(model, tokenizer, cfg.eval, cfg.data, run_dir, label="dense")
    -> {"ppl", "seqlen", "corpus", "ppl_tokens", "ppl_windows", "zeroshot", "zeroshot_norm",
        "zeroshot_tasks", "zeroshot_unavailable", "zeroshot_limit", "zeroshot_avg"}

`ppl` / `ppl_tokens` / `ppl_windows` are None when `eval.ppl` is false; the zero-shot entries are
empty when `eval.zeroshot` is. Per-task details go to `run_dir/zeroshot_<label>.json`.

Each finished part is kept as a stage marker (`run_dir/stages/eval-<label>-ppl.json`,
`eval-<label>-zeroshot.json`) together with a fingerprint of the model weights and of the settings,
so a requeued run skips what already completed on the same weights and redoes it if anything differs.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from pathlib import Path
from typing import Any

from plmtool.errors import PlmtoolError
from plmtool.eval.zeroshot import average, expand_tasks

log = logging.getLogger("plmtool")

# The offline task is a fixed benchmark: its examples do not follow data.seed, so results stay
# comparable across runs that differ only in calibration seed.
OFFLINE_TASK_SEED = 0


def check_config(eval_cfg: Any) -> None:
    """Validate eval settings cheaply (call before loading a model)."""
    from plmtool.eval.zeroshot import resolve

    if eval_cfg.ppl:
        if eval_cfg.seqlen < 2:
            raise PlmtoolError(f"eval.seqlen must be at least 2 (got {eval_cfg.seqlen})")
        if eval_cfg.batch_size < 1:
            raise PlmtoolError(f"eval.batch_size must be at least 1 (got {eval_cfg.batch_size})")
        if eval_cfg.max_tokens is not None and eval_cfg.max_tokens < eval_cfg.seqlen:
            raise PlmtoolError(
                f"eval.max_tokens={eval_cfg.max_tokens} is smaller than one window of eval.seqlen={eval_cfg.seqlen}"
            )
    tasks = expand_tasks(list(eval_cfg.zeroshot or []))
    if tasks:
        if eval_cfg.offline_task_size < 1:
            raise PlmtoolError(f"eval.offline_task_size must be at least 1 (got {eval_cfg.offline_task_size})")
        if eval_cfg.offline_task_choices < 2:
            raise PlmtoolError(f"eval.offline_task_choices must be at least 2 (got {eval_cfg.offline_task_choices})")
        if eval_cfg.zeroshot_batch_size < 1:
            raise PlmtoolError(f"eval.zeroshot_batch_size must be at least 1 (got {eval_cfg.zeroshot_batch_size})")
        if eval_cfg.zeroshot_limit is not None and eval_cfg.zeroshot_limit < 1:
            raise PlmtoolError(f"eval.zeroshot_limit must be at least 1 or null (got {eval_cfg.zeroshot_limit})")
        if eval_cfg.requests_file:
            if not Path(eval_cfg.requests_file).is_file():
                raise PlmtoolError(f"eval.requests_file={eval_cfg.requests_file}: no such file")
        else:
            resolve(tasks, eval_cfg.task_source, eval_cfg.include_path)


def weights_fingerprint(model) -> str:
    """Cheap identity of the weights: shapes + per-tensor L1 norms (no copy of any tensor)."""
    import torch

    h = hashlib.sha1()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta":  # offloaded by accelerate: its values are not here to read
                h.update(f"{name}:{tuple(p.shape)}:offloaded;".encode())
                continue
            norm = torch.linalg.vector_norm(p.detach(), ord=1, dtype=torch.float32)
            h.update(f"{name}:{tuple(p.shape)}:{float(norm):.6e};".encode())
    return h.hexdigest()[:16]


def _settings(eval_cfg: Any, data_cfg: Any) -> dict[str, Any]:
    return {
        "ppl": bool(eval_cfg.ppl),
        "corpus": str(eval_cfg.corpus),
        "seqlen": int(eval_cfg.seqlen),
        "max_tokens": eval_cfg.max_tokens,
        "batch_size": int(eval_cfg.batch_size),
        "zeroshot": expand_tasks(list(eval_cfg.zeroshot or [])),
        "zeroshot_limit": eval_cfg.zeroshot_limit,
        "num_fewshot": int(eval_cfg.num_fewshot),
        "include_path": eval_cfg.include_path,
        "task_source": eval_cfg.task_source,
        "requests_file": eval_cfg.requests_file,
        "offline_task_size": int(eval_cfg.offline_task_size),
        "offline_task_choices": int(eval_cfg.offline_task_choices),
        "data_cache_dir": getattr(data_cfg, "cache_dir", None),
    }


def evaluate(model, tokenizer, eval_cfg: Any, data_cfg: Any, run_dir: str | Path | None, label: str = "eval") -> dict[str, Any]:
    from plmtool.io import Stages

    check_config(eval_cfg)
    stages = Stages(run_dir) if run_dir is not None else None
    weights = weights_fingerprint(model)
    settings = _settings(eval_cfg, data_cfg)
    # Two stages, so a run interrupted during zero-shot keeps its (possibly long) perplexity pass.
    ppl_key = {"weights": weights, "settings": {k: settings[k] for k in ("corpus", "seqlen", "max_tokens", "data_cache_dir")}}
    zs_key = {"weights": weights, "settings": {k: v for k, v in settings.items() if k not in ("ppl", "batch_size")}}

    def reuse(name: str, key: dict) -> Any:
        if stages is not None and stages.done(name):
            saved = stages.result(name)
            if saved.get("key") == key:
                log.info("evaluation stage '%s' already done in %s; reusing it", name, run_dir)
                return saved["result"]
        return None

    def keep(name: str, key: dict, value: Any) -> None:
        if stages is not None:
            stages.mark(name, {"key": key, "result": value})

    result: dict[str, Any] = {
        "ppl": None,
        "seqlen": int(eval_cfg.seqlen),
        "corpus": str(eval_cfg.corpus),
        "ppl_tokens": None,
        "ppl_windows": None,
        "zeroshot": {},
        "zeroshot_norm": {},
        "zeroshot_tasks": {},
        "zeroshot_unavailable": {},
        "zeroshot_limit": eval_cfg.zeroshot_limit,
        "zeroshot_avg": None,
    }
    if eval_cfg.ppl:
        p = reuse(f"eval-{label}-ppl", ppl_key)
        if p is None:
            from plmtool.data.corpora import eval_tokens
            from plmtool.eval import perplexity as perplexity_mod

            ids = eval_tokens(tokenizer, eval_cfg.corpus, data_cfg)
            p = perplexity_mod.perplexity(
                model, ids, eval_cfg.seqlen, batch_size=eval_cfg.batch_size, max_tokens=eval_cfg.max_tokens
            )
            keep(f"eval-{label}-ppl", ppl_key, p)
        log.info("perplexity %s (%s, seqlen %d, %d tokens)", f"{p['ppl']:.4f}", eval_cfg.corpus, p["seqlen"], p["tokens"])
        result.update(ppl=p["ppl"], ppl_tokens=p["tokens"], ppl_windows=p["windows"])

    tasks = expand_tasks(list(eval_cfg.zeroshot or []))
    if tasks:
        zs = reuse(f"eval-{label}-zeroshot", zs_key)
        if zs is None:
            from plmtool.eval.zeroshot import zeroshot

            zs = zeroshot(
                model,
                tokenizer,
                tasks,
                run_dir,
                label,
                batch_size=eval_cfg.zeroshot_batch_size,
                limit=eval_cfg.zeroshot_limit,
                num_fewshot=eval_cfg.num_fewshot,
                include_path=eval_cfg.include_path,
                source=eval_cfg.task_source,
                requests_file=eval_cfg.requests_file,
                generated={"size": eval_cfg.offline_task_size, "choices": eval_cfg.offline_task_choices,
                           "seed": OFFLINE_TASK_SEED, "data_cfg": data_cfg},
            )
            keep(f"eval-{label}-zeroshot", zs_key, zs)
        result.update(zs)
        result["zeroshot_avg"] = average(result["zeroshot"], [t for t in tasks if t not in result["zeroshot_unavailable"]])
    return result
