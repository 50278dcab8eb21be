"""plmtool draft serve: an OpenAI-compatible server with speculative decoding.

    plmtool draft serve draft.checkpoint=outputs/draft/.../drafter          # 127.0.0.1:8000
    plmtool draft serve serve.port=9000 model.dtype=bfloat16                # plain mode: no drafter
    curl 127.0.0.1:8000/v1/chat/completions -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
    from plmtool.draft.decoding.batch import BatchEngine, batch_buckets
    from plmtool.draft.setup import (
        bucket_trees, calibration_sequences, chat_prompt_ids, check_decoding_config, checked_options, engine_options,
        setup_drafter, stop_token_ids,
    )
    from plmtool.draft.config import ServeConfig
    from plmtool.models import load_model
    from plmtool.serve.app import Server

    s, d = checked_options(cfg.serve, ServeConfig), cfg.draft
    check_decoding_config(d)
    options = engine_options(cfg.engine)
    if not options.static_drafter:
        raise PlmtoolError("engine.static_drafter=false is a draft bench option: the server batches every drafter "
                           "through its fixed-shape step")
    model, tokenizer = load_model(cfg.model)
    stops = stop_token_ids(model, tokenizer)
    max_batch = s.batch_for(next(model.parameters()).device)
    drafter, tree, kind, smaller = None, None, None, {}
    if d.checkpoint:
        cal = []
        if isinstance(d.tree, str) and d.tree.startswith("auto") and d.tree_calibration > 0:
            from plmtool.data.chat import load_mtbench

            prompts = [chat_prompt_ids(tokenizer, q["turns"][-1]) for q in load_mtbench()[: d.tree_calibration]]
            # one row is enough for the few calibration answers; dropped before the served engine
            cal = calibration_sequences(BatchEngine(model, max_len=s.max_len, max_batch=1, options=options), prompts, 64, stops)
        if d.dynamic_pool:
            raise PlmtoolError("draft.dynamic_pool is not served: the batched engine decodes static trees")
        setup = setup_drafter(model, d.checkpoint, d.tree, cal, s.max_len, d.tree_accuracy, d.dynamic_pool)
        drafter, tree, kind = setup.drafter, setup.tree, setup.name
        smaller = bucket_trees(setup, batch_buckets(max_batch), s.step_tokens)
    engine = BatchEngine(model, drafter, tree, max_len=s.max_len, max_batch=max_batch, options=options, bucket_trees=smaller)
    model_id = s.model_id or str(cfg.model.name_or_path)
    server = Server(engine, tokenizer, model_id, s, stops, kind)
    return server, {"model_id": model_id, "drafter": kind, "tree_nodes": engine.tree.n if kind else None,
                    "tree_nodes_per_batch_rows": {str(b): t.n for b, t in engine.trees.items()} if kind else None,
                    "max_len": engine.max_len, "max_batch": max_batch, "batch_buckets": engine.buckets,
                    "acceptance": s.acceptance if kind else None, "device": str(engine.device),
                    "cuda_graphs": engine.cuda_graphs, "engine": dataclasses.asdict(options)}


def _uvicorn_server(app, s, on_signal):
    """uvicorn's server with our own signal handling: SIGTERM / SIGINT stop admitting requests and
    let in-flight ones finish within serve.shutdown_timeout_s; the command then returns normally,
    so run.json records `finished` and the report is written (uvicorn re-raises a caught signal
    after its shutdown, which killed the process before either)."""
    import uvicorn

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:  # a second signal: stop now
                self.force_exit = True
            self.should_exit = True
            on_signal(sig)

    config = uvicorn.Config(app, host=s.host, port=s.port, log_level="info",
                            timeout_graceful_shutdown=math.ceil(s.shutdown_timeout_s) + 2)  # after the scheduler's own
    return Uvicorn(config)


def run(cfg: DictConfig, run_dir: Path) -> Report:
    from plmtool.serve.app import create_app

    server, info = build_server(cfg)
    s = server.options
    report = {"host": s.host, "port": s.port, **info}
    if s.dry_run:
        server.scheduler.stop()
        # said on the terminal: a run that exits 0 would otherwise look like a server that stopped
        print(DRY_RUN, flush=True)
        return {**report, "served": 0, "dry_run": True}
    app = create_app(server)
    stopped_by: list[str] = []

    def on_signal(sig) -> None:
        import signal

        stopped_by.append(signal.Signals(sig).name)
        server.scheduler.shutdown(s.shutdown_timeout_s)
        log.info("%s: finishing in-flight requests (up to %gs), then stopping", stopped_by[-1], s.shutdown_timeout_s)

    log.info("serving %s on http://%s:%d (drafter: %s, max_batch %d)", info["model_id"], s.host, s.port,
             info["drafter"] or "none", info["max_batch"])
    _uvicorn_server(app, s, on_signal).run()
    server.scheduler.stop()
    return {**report, "served": server.served, "stopped_by": stopped_by[0] if stopped_by else None,
            "dry_run": False, **server.report()}


def render(report: Report) -> str:
    keys = ("model_id", "drafter", "tree_nodes", "acceptance", "device", "cuda_graphs", "max_batch", "host", "port",
            "served", "tokens", "engine_steps", "sequence_steps", "mean_accepted", "cancelled", "timed_out", "failed",
            "rejected", "stopped_by", "dry_run")
    rows = [[k, report.get(k)] for k in keys if k in report]
    return "# plmtool draft serve\n\n" + md_table(["key", "value"], rows) + "\n"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="draft_serve")
def main(cfg: DictConfig) -> None:
    execute(cfg, run, render)
