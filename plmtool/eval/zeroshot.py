"""Zero-shot accuracy through lm-eval on the in-memory model.

The model is wrapped in lm-eval's `HFLM` as it is (pruned, patched or adapted in memory — no
save/reload), tasks are looked up by name in a `TaskManager` that also scans local task
directories (`include_path`), and `simple_evaluate` runs them. Task names may be presets
(`wanda7`, `sds7`) and the offline task `wiki_next_sentence`, generated on first use.

lm-eval imports take seconds, so every lm-eval import happens inside a function.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from plmtool.errors import PlmtoolError
from plmtool.eval.offline_task import TASK_NAME as OFFLINE_TASK
from plmtool.io import write_text

log = logging.getLogger("plmtool")

# Wanda's zero-shot suite (Sun et al., 2023) and the SDS paper's suite; storycloze needs its data
# downloaded by hand (lm-eval reads it from a local data_dir).
PRESETS: dict[str, list[str]] = {
    "wanda7": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"],
    "sds7": ["copa", "lambada_openai", "openbookqa", "piqa", "rte", "storycloze_2016", "winogrande"],
}
OFFLINE_TASKS = (OFFLINE_TASK,)

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


def _check_include_path(include_path: str | None) -> Path | None:
    if not include_path:
        return None
    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise PlmtoolError(f"eval.include_path={include_path}: no such directory of lm-eval task YAMLs")
    return path.resolve()


def task_manager(include_paths: list[Path], include_defaults: bool):
    """A (cached) lm-eval TaskManager; building its index scans every task YAML (seconds)."""
    key = (tuple(str(p) for p in include_paths), include_defaults)
    if key not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[key] = TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def check_task_names(tasks: list[str], include_path: str | None = None) -> None:
    """Raise PlmtoolError naming any task lm-eval does not know (offline tasks are always known)."""
    user_path = _check_include_path(include_path)
    others = [t for t in tasks if t not in OFFLINE_TASKS]
    if not others:
        return
    tm = task_manager([user_path] if user_path else [], include_defaults=True)
    unknown = [t for t in others if t not in tm.all_tasks]
    if unknown:
        raise PlmtoolError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (presets: {', '.join(PRESETS)}, offline: "
            f"{', '.join(OFFLINE_TASKS)}; other tasks must be lm-eval task names, and a local task needs "
            "eval.include_path=<dir with its YAML>)"
        )


def _metric(entry: dict[str, Any], name: str) -> float | None:
    # lm-eval keys metrics as "<metric>,<filter>"; zero-shot multiple-choice tasks use filter "none".
    for key in (f"{name},none", name):
        value = entry.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _rng_state() -> tuple:
    import numpy as np
    import torch

    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state: tuple) -> None:
    import numpy as np
    import torch

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def zeroshot(
    model,
    tokenizer,
    tasks: list[str],
    run_dir: str | Path | None = None,
    label: str = "eval",
    *,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int = 0,
    include_path: str | None = None,
    offline_task_size: int = 500,
    offline_task_choices: int = 4,
    offline_task_seed: int = 0,
    data_cfg: Any = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Run lm-eval tasks on the in-memory model.

    Returns ({task: acc}, {task: acc_norm}) (acc_norm only for tasks that report it) and, with a
    run_dir, writes lm-eval's results (per-sample logs dropped) to `run_dir/lm_eval_<label>.json`.
    """
    tasks = expand_tasks(tasks)
    if not tasks:
        return {}, {}
    if batch_size < 1:
        raise PlmtoolError(f"eval.zeroshot_batch_size must be at least 1 (got {batch_size})")
    if limit is not None and limit < 1:
        raise PlmtoolError(f"eval.zeroshot_limit must be at least 1 or null (got {limit})")
    check_task_names(tasks, include_path)

    paths: list[Path] = []
    user_path = _check_include_path(include_path)
    if user_path:
        paths.append(user_path)
    if OFFLINE_TASK in tasks:
        from plmtool.eval.offline_task import offline_task_dir

        paths.append(offline_task_dir(offline_task_size, offline_task_choices, offline_task_seed, data_cfg))
    # The default index is only needed for lm-eval's own tasks; skipping it saves seconds.
    needs_defaults = any(t not in OFFLINE_TASKS for t in tasks)
    tm = task_manager(paths, include_defaults=needs_defaults)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    import torch

    # Log-probabilities in fp32 even for bf16/fp16 models (as for perplexity): choices differ by
    # small margins that half-precision log-softmax would blur.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=torch.float32)
    # lm-eval reseeds python/numpy/torch globally; restore them so callers' randomness is unaffected.
    state = _rng_state()
    was_training = model.training
    try:
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=tm,
            log_samples=False,
        )
    except (ConnectionError, OSError) as e:
        raise PlmtoolError(
            f"lm-eval could not load the data of {', '.join(tasks)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            f"(hub tasks need access to a hub, or local copies through eval.include_path; {OFFLINE_TASK} runs offline)"
        ) from None
    finally:
        _set_rng_state(state)
        model.train(was_training)
    if results is None:  # non-zero rank in a distributed run
        return {}, {}

    acc: dict[str, float] = {}
    acc_norm: dict[str, float] = {}
    for task, entry in results.get("results", {}).items():
        a = _metric(entry, "acc")
        if a is not None:
            acc[task] = a
        n = _metric(entry, "acc_norm")
        if n is not None:
            acc_norm[task] = n
    missing = [t for t in tasks if t not in acc]
    if missing:
        log.warning("lm-eval reported no accuracy for: %s", ", ".join(missing))

    if run_dir is not None:
        write_results(results, Path(run_dir) / f"lm_eval_{label}.json")
    return acc, acc_norm


def write_results(results: dict[str, Any], path: Path) -> Path:
    """lm-eval's results JSON without per-sample logs, written atomically."""
    from lm_eval.utils import handle_non_serializable

    slim = {k: v for k, v in results.items() if k != "samples"}
    return write_text(path, json.dumps(slim, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
