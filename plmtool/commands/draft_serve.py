"""plmtool draft serve: an OpenAI-compatible server with speculative decoding.

    plmtool draft serve draft.checkpoint=outputs/draft/.../drafter          # 127.0.0.1:8000
    plmtool draft serve serve.port=9000 model.dtype=bfloat16                # plain mode: no drafter
    curl 127.0.0.1:8000/v1/chat/completions -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

import plmtool.config  # noqa: F401  (registers the shared schemas)
import plmtool.draft.config  # noqa: F401  (registers draft_serve_schema)
from plmtool.errors import PlmtoolError
from plmtool.paths import CONF_DIR
from plmtool.markdown import md_table
from plmtool.runner import Report, execute

log = logging.getLogger("plmtool")

DRY_RUN = "dry run: server built (model, drafter, tree checked); not serving — drop serve.dry_run to serve"


def build_server(cfg: DictConfig):
    """Model (+ drafter and tree) -> Server; shared by the command and the tests."""
    from plmtool.draft.decoding.engine import ACCEPTANCE, SpeculativeEngine
    from plmtool.draft.setup import (
        calibration_sequences, chat_prompt_ids, check_decoding_config, engine_options, setup_drafter, stop_token_ids,
    )
    from plmtool.models import load_model
    from plmtool.serve.app import Server

    s, d = cfg.serve, cfg.draft
    if s.acceptance not in ACCEPTANCE:
        raise PlmtoolError(f"serve.acceptance must be one of {', '.join(ACCEPTANCE)}, got '{s.acceptance}'")
    if not 0 < s.port < 65536:
        raise PlmtoolError(f"serve.port must be in 1..65535, got {s.port}")
    check_decoding_config(d)
    options = engine_options(cfg.engine)
    model, tokenizer = load_model(cfg.model)
    stops = stop_token_ids(model, tokenizer)
    plain = SpeculativeEngine(model, max_len=s.max_len, options=options)
    engine, kind, tree_info = plain, None, None
    if d.checkpoint:
        cal = []
        if isinstance(d.tree, str) and d.tree.startswith("auto") and d.tree_calibration > 0:
            from plmtool.data.chat import load_mtbench

            prompts = [chat_prompt_ids(tokenizer, q["turns"][-1]) for q in load_mtbench()[: d.tree_calibration]]
            cal = calibration_sequences(plain, prompts, 64, stops)
        setup = setup_drafter(model, d.checkpoint, d.tree, cal, s.max_len, d.tree_accuracy, d.dynamic_pool)
        runner = plain.runner  # reuses the KV cache and any compiled step
        del plain
        engine = SpeculativeEngine(model, setup.drafter, setup.tree, max_len=s.max_len, options=options, runner=runner,
                                   dynamic_pool=setup.pool)
        kind, tree_info = setup.name, len(setup.tree) + 1
    model_id = s.model_id or str(cfg.model.name_or_path)
    server = Server(engine, tokenizer, model_id, s.max_tokens_default, s.acceptance, s.typical_epsilon, stops, kind)
    return server, {"model_id": model_id, "drafter": kind, "tree_nodes": tree_info, "max_len": engine.max_len,
                    "acceptance": s.acceptance if kind else None, "device": str(engine.device), "cuda_graphs": engine.cuda_graphs,
                    "compiled": engine.compiled, "drafter_graph": engine.drafter_graph, "prefill_graphs": engine.prefill_graphs,
                    "drafter_prefill_graphs": engine.drafter_prefill_graphs, "dynamic_tree": engine.dynamic,
                    "static_drafter": engine.drafter_step is not None, "greedy_loop": engine.greedy_loop is not None,
                    "engine": dataclasses.asdict(options)}


def run(cfg: DictConfig, run_dir: Path) -> Report:
    from plmtool.serve.app import create_app

    server, info = build_server(cfg)
    app = create_app(server)
    report = {"host": cfg.serve.host, "port": cfg.serve.port, **info}
    if cfg.serve.dry_run:
        # said on the terminal: a run that exits 0 would otherwise look like a server that stopped
        print(DRY_RUN, flush=True)
        return {**report, "served": 0, "dry_run": True}
    import uvicorn

    log.info("serving %s on http://%s:%d (drafter: %s)", info["model_id"], cfg.serve.host, cfg.serve.port, info["drafter"] or "none")
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info")
    return {**report, "served": server.served, "dry_run": False}


def render(report: Report) -> str:
    keys = ("model_id", "drafter", "tree_nodes", "acceptance", "device", "cuda_graphs", "host", "port", "served", "dry_run")
    rows = [[k, report.get(k)] for k in keys]
    return "# plmtool draft serve\n\n" + md_table(["key", "value"], rows) + "\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="draft_serve")
def main(cfg: DictConfig) -> None:
    execute(cfg, run, render)
