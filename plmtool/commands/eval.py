"""plmtool eval: perplexity and zero-shot accuracy of any model or checkpoint.

    plmtool eval                                   # embedded SmolLM2-135M on wiki_sample
    plmtool eval model.name_or_path=outputs/prune/.../model data.corpus=wikitext2
    plmtool eval eval.zeroshot=[sds7] eval.include_path=/data/lm-eval-tasks
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import plmtool.config  # noqa: F401  (registers the schemas)
from plmtool.paths import CONF_DIR
from plmtool.runner import Report, execute, md_table


def run(cfg: DictConfig, run_dir: Path) -> Report:
    from plmtool.eval.suite import check_config, evaluate
    from plmtool.models import load_model
    from plmtool.models.loader import model_info

    check_config(cfg.eval)  # bad settings fail before the model is loaded
    model, tokenizer = load_model(cfg.model)
    result = evaluate(model, tokenizer, cfg.eval, cfg.data, run_dir, label="eval")
    return {"model": cfg.model.name_or_path, "model_info": model_info(model), **result}


def render(report: Report) -> str:
    rows = []
    if report.get("ppl") is not None:
        rows.append([f"perplexity ({report['corpus']}, seqlen {report['seqlen']}, {report['ppl_tokens']} tokens)", report["ppl"]])
    for task, acc in (report.get("zeroshot") or {}).items():
        rows.append([f"zero-shot acc: {task}", acc])
    return f"# plmtool eval: {report['model']}\n\n" + md_table(["metric", "value"], rows) + "\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    execute(cfg, run, render)
