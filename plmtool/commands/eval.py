"""plmtool eval: perplexity and zero-shot accuracy of any model or checkpoint.

    plmtool eval                                   # embedded SmolLM2-135M on wiki_sample
    plmtool eval model.name_or_path=outputs/prune/.../model data.corpus=wikitext2
    plmtool eval eval.zeroshot=[sds7] eval.include_path=/data/lm-eval-tasks
    plmtool eval model.name_or_path=DIR model.dtype=bfloat16 semi_structured=true   # 2:4 on sparse tensor cores
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import plmtool.config  # noqa: F401  (registers the schemas)
from plmtool.errors import PlmtoolError
from plmtool.paths import CONF_DIR
from plmtool.markdown import md_table
from plmtool.runner import Report, execute


def run(cfg: DictConfig, run_dir: Path) -> Report:
    from plmtool.data.corpora import check_corpus
    from plmtool.eval.suite import check_config, evaluate
    from plmtool.models import load_model, resolve_model_source
    from plmtool.models.loader import model_info

    # bad settings and inputs fail in a second, before the model is loaded
    check_config(cfg.eval)
    if cfg.semi_structured:
        check_semi_structured(cfg.model)
    if cfg.eval.ppl:
        check_corpus(cfg.eval.corpus, cfg.data)
    resolve_model_source(cfg.model.name_or_path, cfg.model.gguf_file)
    model, tokenizer = load_model(cfg.model)
    extra = {}
    if cfg.semi_structured:
        from plmtool.prune.semi_structured import to_semi_structured

        extra["semi_structured_layers"] = to_semi_structured(model)
        if not extra["semi_structured_layers"]:
            raise PlmtoolError(f"semi_structured=true: no linear layer of {cfg.model.name_or_path} is 2:4 sparse")
    result = evaluate(model, tokenizer, cfg.eval, cfg.data, run_dir, label="eval")
    return {"model": cfg.model.name_or_path, "model_info": model_info(model), **extra, **result}


def check_semi_structured(model_cfg) -> None:
    """2:4 sparse tensor cores need a CUDA GPU and half-precision weights: say so before loading."""
    import torch

    if not torch.cuda.is_available() or str(model_cfg.device).startswith("cpu"):
        raise PlmtoolError("semi_structured=true needs a CUDA GPU (2:4 sparse tensor cores, Ampere or newer)")
    if model_cfg.dtype not in ("float16", "bfloat16"):
        raise PlmtoolError(f"semi_structured=true needs model.dtype=bfloat16 or float16 (got {model_cfg.dtype})")


def render(report: Report) -> str:
    from plmtool.eval.report import metrics_table

    return f"# plmtool eval: {report['model']}\n\n" + metrics_table(report) + "\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    execute(cfg, run, render)
