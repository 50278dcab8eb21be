"""plmtool draft bench: speed of plain decoding, generate() and Medusa / Amphista speculation.

    plmtool draft bench draft.checkpoint=outputs/draft/.../drafter                 # MT-Bench, all methods
    plmtool draft bench draft.checkpoint=A draft.medusa_checkpoint=M bench.max_new_tokens=256
    plmtool draft bench bench.questions=spec_bench/question.jsonl bench.methods=[ar,amphista]
    plmtool draft bench experiment=smoke draft.checkpoint=D1/drafter               # a few minutes on CPU
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

import plmtool.config  # noqa: F401  (registers the shared schemas)
from plmtool.draft.config import BENCH_METHODS, EngineOptions  # also registers draft_bench_schema
from plmtool.errors import PlmtoolError
from plmtool.paths import CONF_DIR
from plmtool.runner import Report, execute


def _check_config(cfg: DictConfig) -> EngineOptions:
    """Everything checkable before the model loads; returns the engine options."""
    b, d = cfg.bench, cfg.draft
    unknown = [m for m in b.methods if m not in BENCH_METHODS]
    if unknown:
        raise PlmtoolError(f"bench.methods: unknown {unknown} (choose from {', '.join(BENCH_METHODS)})")
    if "ar" not in b.methods:
        raise PlmtoolError("bench.methods must include 'ar': every output is checked against plain greedy decoding")
    if b.runs < 1 or b.max_new_tokens < 1 or b.warmup < 0:
        raise PlmtoolError("bench.runs and bench.max_new_tokens must be >= 1, bench.warmup >= 0")
    if b.questions != "mtbench" and not Path(b.questions).is_file():
        raise PlmtoolError(f"bench.questions: {b.questions} is neither 'mtbench' nor an existing question file")
    from plmtool.draft.setup import check_decoding_config, engine_options

    check_decoding_config(d, checkpoints=("checkpoint", "medusa_checkpoint"), trees=("tree", "medusa_tree"))
    return engine_options(cfg.engine)


def run(cfg: DictConfig, run_dir: Path) -> Report:
    options = _check_config(cfg)
    import dataclasses

    import torch

    from plmtool.data.chat import load_mtbench
    from plmtool.draft.bench.benchmark import (
        engine_method, hf_generate_method, prepare_questions, run_benchmark, spec_bench_lines, summarize, tree_report,
    )
    from plmtool.draft.decoding.engine import SpeculativeEngine
    from plmtool.draft.setup import calibration_sequences, setup_drafter, stop_token_ids
    from plmtool.io import write_text
    from plmtool.models import load_model
    from plmtool.models.loader import model_info
    from plmtool.progress import track

    b, d = cfg.bench, cfg.draft
    torch.manual_seed(cfg.seed)
    questions = load_mtbench(None if b.questions == "mtbench" else b.questions)
    if b.categories:
        questions = [q for q in questions if q["category"] in set(b.categories)]
    if b.num_questions:
        questions = questions[: b.num_questions]
    if not questions:
        raise PlmtoolError("no questions left after bench.categories / bench.num_questions")

    model, tokenizer = load_model(cfg.model)
    device = next(model.parameters()).device
    prepared = prepare_questions(tokenizer, questions, b.system_prompt)
    stops = stop_token_ids(model, tokenizer)
    longest = max(len(q["prompt_ids"]) for q in prepared)
    from plmtool.draft.decoding.target import TargetRunner

    # one runner (KV cache, compiled step) for all our engines: they never decode concurrently
    runner = TargetRunner(model, b.max_len, compile=bool(options.compile))
    ar_engine = SpeculativeEngine(model, max_len=b.max_len, options=options, runner=runner)
    ar_engine.check_request(longest, b.max_new_tokens)

    skipped: dict[str, str] = {}
    setups = {}
    ckpts = [(d.checkpoint, d.tree), (d.medusa_checkpoint, d.medusa_tree if d.medusa_tree is not None else d.tree)]
    wanted_drafters = [m for m in b.methods if m in ("medusa", "amphista")]
    if wanted_drafters and any(p for p, _ in ckpts):
        cal_prompts = [q["calibration_ids"] or q["prompt_ids"] for q in prepared][: d.tree_calibration]
        cal = calibration_sequences(ar_engine, cal_prompts, min(128, b.max_new_tokens), stops)
        for path, spec in ckpts:
            if not path:
                continue
            s = setup_drafter(model, path, spec, cal, b.max_len, d.tree_accuracy, d.dynamic_pool)
            if s.name in setups:
                raise PlmtoolError(f"draft.checkpoint and draft.medusa_checkpoint are both {s.name} drafters")
            setups[s.name] = s
    methods = {}
    for name in b.methods:
        if name == "ar":
            methods[name] = engine_method(ar_engine, b.max_new_tokens, stops)
        elif name in ("hf_generate", "hf_generate_static"):
            methods[name] = hf_generate_method(model, b.max_new_tokens, stops, tokenizer.pad_token_id, static=name.endswith("static"))
        elif name in setups:
            engine = SpeculativeEngine(model, setups[name].drafter, setups[name].tree, max_len=b.max_len, options=options,
                                       runner=runner, dynamic_pool=setups[name].pool)
            engine.check_request(longest, b.max_new_tokens)
            methods[name] = engine_method(engine, b.max_new_tokens, stops)
        else:
            key = "draft.medusa_checkpoint" if name == "medusa" else "draft.checkpoint"
            skipped[name] = f"no {name} checkpoint given ({key}=...)"
    caps = {"hf_generate": b.hf_generate_questions} if b.hf_generate_questions else None
    records = run_benchmark(methods, prepared, device, runs=b.runs, warmup=b.warmup, warmup_tokens=b.warmup_tokens, question_caps=caps, progress=track)
    summary = summarize(records)

    model_id = Path(str(cfg.model.name_or_path)).name
    for name, recs in records.items():
        lines = spec_bench_lines(name, recs, tokenizer, model_id)
        write_text(run_dir / "answers" / f"{name}.jsonl", "".join(json.dumps(x) + "\n" for x in lines))
    return {
        "model": str(cfg.model.name_or_path),
        "model_info": model_info(model),
        "num_questions": len(prepared),
        "question_source": b.questions,
        "engine": dataclasses.asdict(options),
        "setup": {"device": str(device), "dtype": str(model.dtype).replace("torch.", ""), "max_new_tokens": b.max_new_tokens,
                  "runs": b.runs, "warmup": b.warmup, "cuda_graphs": ar_engine.cuda_graphs,
                  "compiled_target_step": ar_engine.compiled, "greedy": True, "batch_size": 1,
                  "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        **summary,
        "trees": {name: tree_report(s) for name, s in setups.items() if name in methods},
        "skipped": skipped,
        "answers_dir": str(run_dir / "answers"),
    }


def render(report: Report) -> str:
    from plmtool.draft.bench.benchmark import render_markdown

    return render_markdown(report)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="draft_bench")
def main(cfg: DictConfig) -> None:
    execute(cfg, run, render)
