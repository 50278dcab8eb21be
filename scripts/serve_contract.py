#!/usr/bin/env python
"""The serving contract, checked against a real `plmtool draft serve` process on 127.0.0.1.

    python scripts/serve_contract.py --model DIR --drafter DIR [--requests 48] [--max-tokens 24]

1. starts `plmtool draft serve` (serve.max_batch=4) and waits for /health;
2. sends `--requests` concurrent requests at temperature 0, half of them streaming, while a probe
   asks /health every 0.1 s: all must complete, /health must answer within 1 s throughout;
3. sends each prompt again alone: every concurrent answer must equal it;
4. counts engine steps (/metrics) for 4 requests one after the other and 4 at once: batched
   decoding must take fewer steps;
5. sends SIGTERM: the process must exit within 10 s with run.json status `finished` and a report
   that counts the steps.

Prints one line per check and exits 1 if any fails. Without --model it builds a tiny random
Llama, tokenizer and Amphista drafter in a temporary directory (what the CPU test uses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_serve import ServerProcess, free_port, server_env  # noqa: E402  (one way to run a server process)

PROMPTS = ["The quick brown fox", "A language model", "Pruning removes weights", "Experts are trained",
           "Speculative decoding drafts", "Numbers: 0 1 2 3", "Once upon a time", "The capital of France"]


def tiny_checkpoints(root: Path) -> tuple[Path, Path]:
    """A tiny random Llama + tokenizer and an Amphista drafter on it, saved under `root`."""
    from plmtool.draft.config import DrafterConfig
    from plmtool.draft.drafter import build_drafter, save_drafter, target_dims
    from tests.conftest import build_tiny_llama, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_llama(len(tok), hidden_size=64)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    drafter = build_drafter(DrafterConfig(kind="amphista", num_heads=3), target=model)
    return root / "model", save_drafter(drafter, root / "drafter", target_dims(model))


def start_server(model: Path, drafter: Path | None, work: Path, extra: list[str], timeout_s: float = 300) -> ServerProcess:
    """`plmtool draft serve` (serve.max_batch=4) on a free port, its run directory and log under
    `work`; returns once /health answers."""
    port = free_port()
    run_dir = work / "serve_contract"
    cmd = [sys.executable, "-m", "plmtool", "draft", "serve", f"model.name_or_path={model}", f"serve.port={port}",
           "serve.max_batch=4", "serve.max_len=256", f"hydra.run.dir={run_dir}", "model.dtype=float32"]
    if drafter is not None:
        cmd += [f"draft.checkpoint={drafter}", "draft.tree=[[0],[1],[0,0],[1,0],[0,0,0]]"]
    server = ServerProcess(work, "contract", cmd + list(extra), server_env(None), port)
    server.start()
    server.wait_ready(timeout_s)
    return server


async def complete(client: httpx.AsyncClient, model_id: str, prompt: str, max_tokens: int, stream: bool) -> str:
    body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]
    text = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']}")
                text += [c["text"] for c in event["choices"]]
    return "".join(text)


async def engine_steps(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("plmtool_engine_steps_total"))


async def probe(client: httpx.AsyncClient, stop: asyncio.Event, worst: list[float]) -> None:
    """/health every 0.1 s: the slowest answer (inf for a failure) goes into `worst`."""
    while not stop.is_set():
        t = time.monotonic()
        try:
            ok = (await client.get("/health", timeout=5)).status_code == 200
        except httpx.TransportError:
            ok = False
        worst.append(time.monotonic() - t if ok else float("inf"))
        await asyncio.sleep(0.1)


async def exercise(base_url: str, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=requests + 8, max_keepalive_connections=requests + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client, \
            httpx.AsyncClient(base_url=base_url) as health:
        model_id = (await client.get("/v1/models")).json()["data"][0]["id"]
        prompts = [PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(requests)]
        stop, worst = asyncio.Event(), []
        prober = asyncio.create_task(probe(health, stop, worst))
        t0 = time.monotonic()
        got = await asyncio.gather(*(complete(client, model_id, p, max_tokens, stream=i % 2 == 1)
                                     for i, p in enumerate(prompts)), return_exceptions=True)
        concurrent_s = time.monotonic() - t0
        stop.set()
        await prober
        failures = [repr(g) for g in got if isinstance(g, BaseException)]
        alone = [await complete(client, model_id, p, max_tokens, stream=False) for p in prompts]
        differ = [i for i, (a, b) in enumerate(zip(got, alone)) if a != b]
        four = prompts[:4]
        s0 = await engine_steps(client)
        for p in four:
            await complete(client, model_id, p, max_tokens, stream=False)
        s1 = await engine_steps(client)
        await asyncio.gather(*(complete(client, model_id, p, max_tokens, stream=False) for p in four))
        s2 = await engine_steps(client)
    return {"requests": requests, "completed": requests - len(failures), "failures": failures[:3],
            "differ_from_alone": differ, "health_worst_s": max(worst) if worst else None, "health_probes": len(worst),
            "concurrent_s": round(concurrent_s, 2), "steps_sequential_4": s1 - s0, "steps_concurrent_4": s2 - s1}


def run_contract(model: Path, drafter: Path | None, work: Path, requests: int = 48, max_tokens: int = 24,
                 extra: list[str] | None = None) -> dict:
    """Everything above (the server's run directory: WORK/serve_contract); returns the
    measurements and `checks` (name -> passed)."""
    server = start_server(model, drafter, work, list(extra or []))
    try:
        out = asyncio.run(exercise(server.base_url, requests, max_tokens))
    finally:
        stopped = server.stop(30)  # SIGTERM, then a kill after 30 s
    out["exit_s"] = stopped.get("exit_s", 0.0)
    out["exit_code"] = stopped.get("returncode")
    out["run_status"] = stopped.get("run_status")
    report = server.run_dir / "report.json"
    out["report_engine_steps"] = json.loads(report.read_text()).get("engine_steps") if report.is_file() else None
    out["server_log_tail"] = server.tail()
    out["checks"] = {
        f"all {requests} concurrent requests complete": out["completed"] == requests,
        "each equals the same prompt sent alone": not out["differ_from_alone"] and out["completed"] == requests,
        "/health answers within 1 s throughout": out["health_worst_s"] is not None and out["health_worst_s"] < 1.0,
        "SIGTERM: exit within 10 s, code 0": out["exit_s"] < 10 and out["exit_code"] == 0,
        "run.json status finished": out["run_status"] == "finished",
        "4 concurrent requests take fewer engine steps than 4 sequential": out["steps_concurrent_4"] < out["steps_sequential_4"],
        "the report counts engine steps": isinstance(out["report_engine_steps"], int) and out["report_engine_steps"] > 0,
    }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF checkpoint directory or GGUF (default: a tiny random Llama)")
    ap.add_argument("--drafter", type=Path, help="drafter checkpoint (default: an untrained Amphista on the tiny model)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--work", type=Path, help="where the server's run directory and log go (default: a temporary folder)")
    ap.add_argument("overrides", nargs="*", help="more `plmtool draft serve` overrides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, drafter = args.model, args.drafter
        if model is None:
            model, drafter = tiny_checkpoints(Path(tmp))
        out = run_contract(model, drafter, args.work or Path(tmp), args.requests, args.max_tokens, args.overrides)
    print(json.dumps({k: v for k, v in out.items() if k not in ("checks", "server_log_tail")}, indent=1))
    for name, ok in out["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(out["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
