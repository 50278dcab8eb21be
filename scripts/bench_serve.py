#!/usr/bin/env python
"""GPU load benchmark of `plmtool draft serve`: speculative decoding (a trained Amphista drafter)
against plain decoding, both from the same server code, at several numbers of concurrent clients.

Data: the file written on the CPU side by `scripts/bench_draft.py prepare` (keys "mtbench" and
"sharegpt"; .json, .json.gz or .json.xz), read with that script's reader; there is no second
prepare command. Requests ask MT-Bench's first turns, in order; the drafter trains on ShareGPT.

    python scripts/bench_draft.py prepare --out .device/draft/data.json --sharegpt 2000

  run  (the GPU machine; `python3 -m plmtool draft serve` must work there):
         python3 scripts/bench_serve.py run --data .device/draft/data.json --model /tmp/smollm2.gguf \\
             --out $OUT --work /tmp/serve_work
       1. the drafter: --drafter DIR, or an Amphista drafter trained once into WORK/drafter through
          plmtool.draft.train.train_drafter (bench_draft.py's resumable training: a run stopped by
          --train-budget-s checkpoints, and the same command continues it);
       2. for each mode (speculative, plain) one server subprocess, and for each --concurrency c:
          a warm-up, then c async clients sharing one queue of --requests-per-level requests;
          /metrics is scraped once per mode; the server is stopped with SIGTERM;
       3. identity: a float32 server with the drafter answers --identity-requests greedy requests
          sent all at once, then the same requests one at a time; the texts must be identical.
       Results go to WORK/bench_serve.json after every level and are copied to OUT/bench_serve.json
       (and a table to OUT/bench_serve.md). Rerunning the same command with the same --work skips
       whatever is finished, which is how it fits machines that cut each command after 10 minutes;
       --budget-s stops starting new levels or servers after that many seconds (and stops the
       server cleanly), so a cut command loses at most the level it was in.

What the script reads from the server: GET /health (any 200 means ready), GET /v1/models
(data[0].id, the model name to send), POST /v1/chat/completions (choices[0].message.content,
usage.completion_tokens, and the optional `speculative` object: steps and mean_accepted; plain
decoding reports one token per step) and GET /metrics (Prometheus text, optional). A speculative
server's auto tree calibrates on MT-Bench, which plmtool reads from an installed package; where that
package is missing (the GPU machine), the data file's questions are laid out for it (mtbench_site).
Servers without continuous batching take --max-batch 0 (no serve.max_batch / serve.max_queue).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
# the repository (plmtool) and its scripts (bench_draft: the data file's reader and drafter training)
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench_draft  # noqa: E402

MODES = ("speculative", "plain")
RESULTS = "bench_serve.json"

# the targets this benchmark checks (printed PASS/FAIL with the measured ratios)
SCALING_TARGET = 8.0  # speculative tokens/s at 16 clients over speculative at 1
SINGLE_SPEEDUP_TARGET = 1.5  # speculative over plain, one client
LOADED_SPEEDUP_TARGET = 1.0  # speculative over plain, 16 clients
LOADED_CONCURRENCY = 16

# arguments that do not change what is measured: they may differ between the commands of one run
NOT_SETTINGS = {"commit", "cmd", "out", "work", "data", "concurrency", "budget_s", "train_budget_s", "startup_timeout_s",
                "stop_timeout_s", "request_timeout_s", "fresh", "port"}


# ============================================================================ statistics


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def response_record(index: int, status: int | None, latency_s: float, body, error: str | None = None) -> dict:
    """What one request left: status, latency, generated tokens and the server's decoding steps
    with their mean accepted tokens. `speculative` is optional in the response: without it, the
    request does not count in accepted tokens per step."""
    rec = {"index": index, "status": status, "latency_s": round(latency_s, 4), "completion_tokens": 0,
           "steps": None, "mean_accepted": None, "text": None, "error": error}
    if status != 200 or not isinstance(body, dict):
        if rec["error"] is None:
            rec["error"] = (json.dumps(body) if not isinstance(body, str) else body)[:1000]
        return rec
    usage = body.get("usage") or {}
    rec["completion_tokens"] = int(usage.get("completion_tokens") or 0)
    spec = body.get("speculative") or {}
    rec["mean_accepted"] = spec.get("mean_accepted")
    if spec.get("steps") is not None:
        rec["steps"] = int(spec["steps"])
    choices = body.get("choices") or [{}]
    rec["text"] = (choices[0].get("message") or {}).get("content", choices[0].get("text"))
    return rec


def summarize_level(records: list[dict], wall_s: float) -> dict:
    """Aggregate tokens/s (all generated tokens over the level's wall time), latency median and p95
    of the answered requests, accepted tokens per step over all requests' steps, and the errors
    (non-200 answers and failed connections) with the first one's body."""
    ok = [r for r in records if r["status"] == 200]
    failed = [r for r in records if r["status"] != 200]
    tokens = sum(r["completion_tokens"] for r in ok)
    latencies = [r["latency_s"] for r in ok]
    return {
        "requests": len(records),
        "answered": len(ok),
        "errors": len(failed),
        "first_error": (f"{failed[0]['status']}: {failed[0]['error']}" if failed else None),
        "wall_s": round(wall_s, 3),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "latency_median_s": _round(percentile(latencies, 50)),
        "latency_p95_s": _round(percentile(latencies, 95)),
        "accepted_per_step": accepted_per_step(ok),
    }


def accepted_per_step(records: list[dict]) -> float | None:
    """Tokens accepted per decoding step, pooled over the requests: each request's mean accepted
    weighted by its steps. Not completion tokens over steps: the first token of every answer comes
    from the prompt's prefill, which is no step (plain decoding would read 1 + 1/steps, not 1).
    A request with steps but no mean accepted counts its tokens over its steps instead."""
    with_steps = [r for r in records if r["steps"]]
    if not with_steps:
        return None
    accepted = sum(r["mean_accepted"] * r["steps"] if r["mean_accepted"] is not None else r["completion_tokens"]
                   for r in with_steps)
    return round(accepted / sum(r["steps"] for r in with_steps), 4)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def compare_identity(together: list[dict], alone: list[dict]) -> dict:
    """Texts of the requests sent all at once against the same requests sent one at a time, by
    request index. A request that failed either way counts as not identical and is listed apart."""
    by_index = {r["index"]: r for r in alone}
    identical, differ, failed, examples = 0, [], [], []
    for r in sorted(together, key=lambda r: r["index"]):
        a = by_index.get(r["index"])
        if a is None or r["status"] != 200 or a["status"] != 200:
            failed.append(r["index"])
        elif r["text"] == a["text"]:
            identical += 1
        else:
            differ.append(r["index"])
            if len(examples) < 3:  # enough to see where they part, small enough for the report
                cut = next((i for i, (x, y) in enumerate(zip(r["text"], a["text"])) if x != y),
                           min(len(r["text"]), len(a["text"])))
                examples.append({"index": r["index"], "first_difference_at_char": cut,
                                 "together": r["text"][max(cut - 80, 0): cut + 120],
                                 "alone": a["text"][max(cut - 80, 0): cut + 120],
                                 "tokens_together": r["completion_tokens"], "tokens_alone": a["completion_tokens"]})
    return {"requests": len(together), "identical": identical, "differ": differ, "failed": failed, "examples": examples}


# ============================================================================ load generation


def chat_body(model_id: str, question: str, max_tokens: int) -> dict:
    return {"model": model_id, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0}


async def chat_request(client, index: int, model_id: str, question: str, max_tokens: int) -> dict:
    """One greedy chat completion; never raises (a failed connection is an error record)."""
    import httpx

    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/chat/completions", json=chat_body(model_id, question, max_tokens))
    except httpx.HTTPError as e:
        return response_record(index, None, time.perf_counter() - t0, None, f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - t0
    try:
        body = r.json()
    except ValueError:
        body = r.text
    return response_record(index, r.status_code, latency, body)


async def run_load(client, model_id: str, questions: list[str], concurrency: int, requests: int,
                   max_tokens: int) -> tuple[list[dict], float, int]:
    """`concurrency` clients take requests 0..`requests`-1 (question i mod len(questions)) from
    one shared queue until it is empty: a client sends its next request as soon as its last one
    is answered, so the server sees `concurrency` requests at a time until the tail.

    `client` is an httpx.AsyncClient with base_url set (injected: the tests pass a fake server).
    Returns (records by request index, wall seconds, most requests in flight at once)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    records: list[dict] = []
    in_flight = {"now": 0, "max": 0}

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
            try:
                records.append(await chat_request(client, i, model_id, questions[i % len(questions)], max_tokens))
            finally:
                in_flight["now"] -= 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return sorted(records, key=lambda r: r["index"]), wall, in_flight["max"]


def new_client(base_url: str, max_concurrency: int, timeout_s: float):
    """One shared client: a connection per concurrent request (no waiting for a free connection
    inside the client), no proxies from the environment (the server is local)."""
    import httpx

    limits = httpx.Limits(max_connections=max_concurrency + 4, max_keepalive_connections=max_concurrency + 4)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(timeout_s, connect=30.0),
                             trust_env=False)


async def measure_level(client, model_id: str, questions: list[str], concurrency: int, args) -> dict:
    """Warm-up, then the measured requests. The warm-up sends as many requests at once as the
    server batches (at least --warmup), short ones, so batch shapes are compiled or captured
    before the clock starts."""
    n_warm = max(args.warmup, min(concurrency, args.max_batch or concurrency))
    warm, _, _ = await run_load(client, model_id, questions, n_warm, n_warm, args.warmup_tokens)
    requests = args.requests_per_level or max(16, 2 * concurrency)
    records, wall, max_in_flight = await run_load(client, model_id, questions, concurrency, requests, args.max_tokens)
    level = {"concurrency": concurrency, **summarize_level(records, wall), "max_in_flight": max_in_flight,
             "warmup_requests": n_warm, "warmup_errors": sum(r["status"] != 200 for r in warm),
             "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    level["records"] = [{k: v for k, v in r.items() if k != "text"} for r in records]
    return level


async def scrape_metrics(client) -> dict:
    """GET /metrics: the sample lines (comments left out), or why there are none."""
    import httpx

    try:
        r = await client.get("/metrics")
    except httpx.HTTPError as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}", "lines": None}
    if r.status_code != 200:
        return {"status": r.status_code, "lines": None}
    return {"status": 200, "lines": [x for x in r.text.splitlines() if x.strip() and not x.startswith("#")]}


# ============================================================================ report: table and targets


def tokens_per_s(results: dict, mode: str, concurrency: int) -> float | None:
    level = results.get("modes", {}).get(mode, {}).get("levels", {}).get(str(concurrency))
    return level.get("tokens_per_s") if level else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def check_targets(results: dict) -> list[dict]:
    """The four targets, each with its measured value and pass (None: not measured)."""
    out = []
    ident = results.get("identity")
    if ident:
        ok = ident["identical"] == ident["requests"] and not ident["failed"]
        out.append({"target": f"{ident['requests']} concurrent fp32 greedy all complete and identical to alone",
                    "measured": f"{ident['identical']} of {ident['requests']}", "pass": ok})
    else:
        out.append({"target": "concurrent fp32 greedy all complete and identical to alone", "measured": None, "pass": None})
    c = LOADED_CONCURRENCY
    for name, num, den, goal in (
        (f"speculative tokens/s at {c} >= {SCALING_TARGET:g}x speculative at 1",
         tokens_per_s(results, "speculative", c), tokens_per_s(results, "speculative", 1), SCALING_TARGET),
        (f"speculative >= {SINGLE_SPEEDUP_TARGET:g}x plain at 1",
         tokens_per_s(results, "speculative", 1), tokens_per_s(results, "plain", 1), SINGLE_SPEEDUP_TARGET),
        (f"speculative >= plain at {c}",
         tokens_per_s(results, "speculative", c), tokens_per_s(results, "plain", c), LOADED_SPEEDUP_TARGET),
    ):
        r = _ratio(num, den)
        out.append({"target": name, "measured": None if r is None else round(r, 3), "pass": None if r is None else r >= goal})
    return out


def render_table(results: dict) -> str:
    """Markdown: one row per mode and concurrency; x single-request = tokens/s over the same
    mode's at concurrency 1."""
    lines = ["| mode | concurrency | tokens/s | × single-request | latency median s | p95 s | accepted/step | errors |",
             "|---|---|---|---|---|---|---|---|"]

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for mode in MODES:
        levels = results.get("modes", {}).get(mode, {}).get("levels", {})
        single = tokens_per_s(results, mode, 1)
        for c in sorted(levels, key=int):
            lv = levels[c]
            lines.append(f"| {mode} | {c} | {fmt(lv['tokens_per_s'], '.1f')} "
                         f"| {fmt(_ratio(lv['tokens_per_s'], single), '.2f')} | {fmt(lv['latency_median_s'], '.2f')} | {fmt(lv['latency_p95_s'], '.2f')} "
                         f"| {fmt(lv['accepted_per_step'], '.2f')} | {lv['errors']} |")
    return "\n".join(lines)


def render_targets(targets: list[dict]) -> str:
    lines = []
    for i, t in enumerate(targets, 1):
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[t["pass"]]
        measured = t["measured"] if isinstance(t["measured"], str) or t["measured"] is None else f"{t['measured']:.2f}x"
        lines.append(f"({i}) {t['target']}: {measured if measured is not None else '-'} — {verdict}")
    return "\n".join(lines)


def render_report(results: dict) -> str:
    env = results.get("environment", {})
    head = f"# plmtool draft serve under load ({env.get('card') or 'no GPU'}, commit {env.get('git_commit') or 'unknown'})"
    parts = [head, "", render_table(results), "", render_targets(results.get("targets") or check_targets(results))]
    ident = results.get("identity")
    if ident and (ident["differ"] or ident["failed"]):
        parts.append(f"identity: differ at {ident['differ']}, failed at {ident['failed']}")
    if not results.get("complete"):
        parts.append("\nINCOMPLETE: rerun the same command with the same --work to continue")
    return "\n".join(parts) + "\n"


# ============================================================================ the server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args, run_dir: Path, port: int, dtype: str, drafter: str | None) -> list[str]:
    """`python -m plmtool draft serve` with Hydra overrides; --max-batch 0 leaves the batching keys
    out (for servers without them); --server-arg KEY=VALUE comes last, so it wins."""
    cmd = [sys.executable, "-m", "plmtool", "draft", "serve", f"model.name_or_path={args.model}", f"model.dtype={dtype}",
           f"serve.port={port}", f"serve.max_len={args.max_len}", f"hydra.run.dir={run_dir}"]
    if args.max_batch:
        cmd += [f"serve.max_batch={args.max_batch}", f"serve.max_queue={args.max_queue}"]
    if drafter:
        cmd += [f"draft.checkpoint={drafter}", f"draft.tree={args.tree}"]
    return cmd + list(args.server_arg)


class ServerDied(RuntimeError):
    pass


class ServerProcess:
    """One server subprocess, its output in WORK/serve_<name>.log and its pid in
    WORK/serve_<name>.pid (a server left behind by a command cut by the machine's time limit is
    stopped before the next one of that name starts)."""

    def __init__(self, work: Path, name: str, cmd: list[str], env: dict, port: int):
        self.run_dir = work / f"serve_{name}"
        self.log_path = work / f"serve_{name}.log"
        self.pid_path = work / f"serve_{name}.pid"
        self.cmd, self.env, self.port = cmd, env, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.record: dict = {}  # what the report keeps of this server: command, start-up, health, stop

    def _stop_left_over(self) -> None:
        try:
            pid = int(self.pid_path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if f"hydra.run.dir={self.run_dir}".encode() not in cmdline:  # the pid belongs to someone else now
            return
        print(f"stopping a server left by an earlier command (pid {pid})", flush=True)
        os.kill(pid, signal.SIGTERM)
        for _ in range(300):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    def start(self) -> None:
        self._stop_left_over()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.cmd)}\n".encode())
        log.flush()
        self.t_start = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=str(ROOT))
        log.close()  # the child has its own descriptor
        self.pid_path.write_text(str(self.proc.pid))

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"

    def wait_ready(self, timeout_s: float) -> dict:
        """Polls GET /health until it answers 200; returns its body. Raises ServerDied when the
        process exits first or the timeout passes (the process is then stopped)."""
        import httpx

        deadline = time.perf_counter() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=5.0, trust_env=False) as c:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise ServerDied(f"server exited with status {self.proc.returncode} before answering /health; "
                                     f"last lines of {self.log_path}:\n{self.tail()}")
                try:
                    r = c.get("/health")
                    if r.status_code == 200:
                        self.startup_s = round(time.perf_counter() - self.t_start, 2)
                        try:
                            return r.json()
                        except ValueError:
                            return {"text": r.text[:500]}
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        self.stop(10)
        raise ServerDied(f"server did not answer /health within {timeout_s:.0f} s; last lines of {self.log_path}:\n{self.tail()}")

    def model_id(self, fallback: str) -> str:
        import httpx

        try:
            r = httpx.get(self.base_url + "/v1/models", timeout=10.0, trust_env=False)
            return r.json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            return fallback

    def stop(self, timeout_s: float) -> dict:
        """SIGTERM, then wait: how long the exit took, its status and what run.json recorded."""
        if self.proc is None:
            return {}
        out: dict = {}
        if self.proc.poll() is None:
            t0 = time.perf_counter()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
                out["killed"] = False
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                out["killed"] = True
            out["exit_s"] = round(time.perf_counter() - t0, 2)
        else:
            out["exited_before_stop"] = True
        out["returncode"] = self.proc.returncode
        self.pid_path.unlink(missing_ok=True)
        try:
            out["run_status"] = json.loads((self.run_dir / "run.json").read_text()).get("status")
        except (OSError, ValueError):
            out["run_status"] = None
        self.proc = None
        return out


def mtbench_site(work: Path, mtbench: list[dict]) -> Path | None:
    """A folder for the server's PYTHONPATH that holds MT-Bench where plmtool's embedded-data
    reader looks for it, made only when the package that ships it is not installed (the GPU
    machine). The server's auto tree calibrates on MT-Bench questions; without them it would
    fail at start. The questions are the data file's, so the same as where the package exists."""
    from plmtool.data.embedded import FILES

    package, relative, _ = FILES["mtbench"]
    if importlib.util.find_spec(package) is not None:
        return None
    site = work / "site"
    path = site / package / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(q) + "\n" for q in mtbench))
    return site


def server_env(site: Path | None) -> dict:
    env = dict(os.environ)
    paths = ([str(site)] if site else []) + [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ============================================================================ the drafter


def training_configs(args):
    from plmtool.draft.config import DraftDataConfig, DrafterConfig, DraftTrainerConfig

    steps = args.train_steps
    # the same settings as bench_draft.py's training, but for the batch and the labels
    trainer = DraftTrainerConfig(lr=args.lr, warmup_steps=min(50, max(steps // 10, 1)), max_steps=steps,
                                 batch_size=args.train_batch, eval_every=max(steps // 4, 1), save_every=min(100, steps),
                                 log_every=50, cache_hidden=True, cache_hidden_max_gb=args.cache_gb, seed=0,
                                 labels=args.labels)
    data = DraftDataConfig(max_seq_len=args.seq_len, heldout=args.heldout, min_assistant_tokens=8)
    drafter = DrafterConfig(kind="amphista", num_heads=args.heads, **bench_draft._overrides(args.amphista))
    return drafter, trainer, data


def ensure_drafter(args, data: dict, work: Path, t_start: float) -> tuple[str | None, dict]:
    """The drafter's checkpoint directory and what to report of it; (None, ...) when training
    stopped at --train-budget-s (checkpointed: the same command resumes it)."""
    if args.drafter:
        return args.drafter, {"path": args.drafter, "trained_here": False}
    import torch

    from plmtool.draft.train import train_drafter
    from plmtool.models import load_model

    cfg, trainer, dcfg = training_configs(args)
    run_dir = work / "drafter"
    path = str(run_dir / "drafter")
    if bench_draft._finished(run_dir, cfg, trainer):
        metrics = json.loads((run_dir / "train_metrics.json").read_text())
        print(f"drafter: trained before ({path})", flush=True)
    else:
        cuda = torch.cuda.is_available()
        model, tok = load_model(SimpleNamespace(name_or_path=args.model, dtype="bfloat16" if cuda else "float32",
                                                   device="cuda" if cuda else "cpu"))
        if args.train_budget_s:  # what is left of this command's budget; the loop checkpoints at its end
            left = args.train_budget_s - (time.perf_counter() - t_start)
            trainer = dataclasses.replace(trainer, max_time_s=max(left, 1.0))
        metrics = train_drafter(model, tok, cfg, trainer, data["sharegpt"][: args.conversations], run_dir, data_cfg=dcfg)
        del model
        if cuda:
            torch.cuda.empty_cache()  # the servers come next, each with its own copy of the target
        if not metrics.get("finished", True):
            print(f"drafter: training stopped at step {metrics['steps_done']} of {metrics['steps']} by --train-budget-s",
                  flush=True)
            return None, {"path": path, "trained_here": True, "finished": False, "steps_done": metrics["steps_done"]}
    keep = ("kind", "num_heads", "heads", "labels", "steps", "wall_time_s", "train_conversations", "parameters")
    return path, {"path": path, "trained_here": True, "finished": True, **{k: metrics.get(k) for k in keep}}


# ============================================================================ run


def environment() -> dict:
    import torch

    env = {"card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
           "python": sys.version.split()[0]}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           check=True).stdout.strip()
        env["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                               capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"], env["git_dirty"] = None, None
    return env


def settings_of(args) -> dict:
    """What the saved results depend on; a resumed run must match it."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}))


def load_results(path: Path, settings: dict, fresh: bool) -> dict:
    if fresh or not path.is_file():
        return {"settings": settings, "commands": [], "modes": {m: {"levels": {}, "servers": []} for m in MODES}}
    results = json.loads(path.read_text())
    if results.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(results.get("settings", {}))
                         if settings.get(k) != results.get("settings", {}).get(k))
        raise SystemExit(f"{path} was measured with other settings ({', '.join(changed)}): pass --fresh to start over "
                         f"or use another --work")
    return results


def _exit_on_sigterm(signum, frame) -> None:
    # a time limit's SIGTERM unwinds through the `finally` blocks that stop the server subprocess
    raise SystemExit(128 + signum)


def run(args) -> int:
    t_start = time.perf_counter()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    data = bench_draft._load_data(args.data)
    questions = [q["turns"][0] for q in data["mtbench"]]
    results = load_results(work / RESULTS, settings_of(args), args.fresh)
    env = environment()
    if args.commit:  # a copied checkout may carry another history than the code it holds
        env["git_commit"], env["git_dirty"] = args.commit, None
    results["environment"] = env  # this command's; each level also records its card
    results["commands"].append({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **env})

    def save() -> None:
        results["targets"] = check_targets(results)
        text = json.dumps(results, indent=1)
        for p in (work / RESULTS, out / RESULTS):
            tmp = p.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(p)  # a command cut mid-write leaves the previous file whole
        (out / "bench_serve.md").write_text(render_report(results))

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - t_start > args.budget_s

    def finish(stopped_early: bool) -> int:
        results["complete"] = not stopped_early
        save()
        print("\n" + render_report(results), flush=True)
        return 0

    results["complete"] = False
    save()
    drafter, info = ensure_drafter(args, data, work, t_start)
    results["drafter"] = info
    save()
    if drafter is None:
        return finish(True)
    site = mtbench_site(work, data["mtbench"])
    env_vars = server_env(site)

    def serve(name: str, dtype: str, with_drafter: bool) -> ServerProcess:
        port = args.port or free_port()
        cmd = server_command(args, work / f"serve_{name}", port, dtype, drafter if with_drafter else None)
        server = ServerProcess(work, name, cmd, env_vars, port)
        print(f"starting {name} server: {' '.join(cmd)}", flush=True)
        server.start()
        try:
            health = server.wait_ready(args.startup_timeout_s)
        except ServerDied as e:
            print(str(e), file=sys.stderr, flush=True)
            results.setdefault("failures", []).append({"server": name, "command": cmd, "error": str(e)[-4000:]})
            save()
            raise SystemExit(1)
        server.record = {"command": cmd, "startup_s": server.startup_s, "health": health,
                         "model_id": server.model_id(args.model), "card": env["card"]}
        print(f"{name} server ready in {server.startup_s:.1f} s (model id {server.record['model_id']})", flush=True)
        return server

    def stop(server: ServerProcess, record: dict) -> None:
        record.update(server.stop(args.stop_timeout_s))
        try:  # the server's own report (engine settings, requests served), written as it exits
            record["report"] = json.loads((server.run_dir / "report.json").read_text())
        except (OSError, ValueError):
            pass
        print(f"server stopped in {record.get('exit_s', 0):.1f} s, status {record.get('returncode')}, "
              f"run.json status {record.get('run_status')}", flush=True)

    # ------------------------------------------------------------------ load levels, one server per mode
    for mode in MODES:
        state = results["modes"][mode]
        todo = [c for c in concurrency if str(c) not in state["levels"]]
        if not todo:
            continue
        if over_budget():
            return finish(True)
        server = serve(mode, args.dtype, mode == "speculative")
        state["servers"].append(server.record)
        save()

        async def levels() -> bool:
            """The remaining levels of this mode; False when the budget stopped them."""
            async with new_client(server.base_url, max(todo + [args.warmup]), args.request_timeout_s) as client:
                try:
                    for c in todo:
                        if over_budget():
                            return False
                        lv = await measure_level(client, server.record["model_id"], questions, c, args)
                        lv["card"] = env["card"]
                        state["levels"][str(c)] = lv
                        save()
                        print(f"{mode} c={c}: {lv['tokens_per_s']} tokens/s, latency median {lv['latency_median_s']} s "
                              f"p95 {lv['latency_p95_s']} s, accepted/step {lv['accepted_per_step']}, "
                              f"errors {lv['errors']} (max in flight {lv['max_in_flight']})", flush=True)
                        if server.proc.poll() is not None:
                            raise ServerDied(f"{mode} server died during the level at {c} clients:\n{server.tail()}")
                    return True
                finally:
                    state["metrics"] = await scrape_metrics(client)

        try:
            done = asyncio.run(levels())
        except ServerDied as e:
            print(str(e), file=sys.stderr, flush=True)
            stop(server, server.record)
            save()
            return 1
        finally:
            if server.proc is not None:
                stop(server, server.record)
            save()
        if not done:
            return finish(True)

    # ------------------------------------------------------------------ identity: together vs one at a time, fp32
    if args.identity_requests and "identity" not in results:
        if over_budget():
            return finish(True)
        server = serve("identity", args.identity_dtype, True)
        n = args.identity_requests

        async def identity() -> dict:
            async with new_client(server.base_url, n, args.request_timeout_s) as client:
                model_id = server.record["model_id"]
                await run_load(client, model_id, questions, args.warmup, args.warmup, args.warmup_tokens)
                together, wall_t, max_in_flight = await run_load(client, model_id, questions[:n], n, n, args.identity_tokens)
                alone, wall_a, _ = await run_load(client, model_id, questions[:n], 1, n, args.identity_tokens)
            return {**compare_identity(together, alone), "dtype": args.identity_dtype, "max_tokens": args.identity_tokens,
                    "max_in_flight": max_in_flight, "together_s": round(wall_t, 2), "alone_s": round(wall_a, 2)}

        try:
            ident = asyncio.run(identity())
        finally:
            stop(server, server.record)
        results["identity"] = {**ident, "server": server.record}
        save()
        print(f"identity: {ident['identical']} of {ident['requests']} identical; differ {ident['differ']}, "
              f"failed {ident['failed']}", flush=True)
    return finish(False)


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("run", help="train (or take) a drafter, then load-test plain and speculative servers")
    pr.add_argument("--data", required=True, help="the file of `scripts/bench_draft.py prepare`")
    pr.add_argument("--model", default="smollm2-135m", help="model.name_or_path of the servers and the training")
    pr.add_argument("--out", required=True)
    pr.add_argument("--work", default="/tmp/serve_work", help="drafter, server run dirs and logs, results: reused on rerun")
    pr.add_argument("--commit", default=None, help="the commit the copied code is (recorded instead of `git rev-parse`)")
    pr.add_argument("--fresh", action="store_true", help="discard the results saved in --work (not the drafter)")
    pr.add_argument("--budget-s", type=float, default=420,
                    help="start no new level or server after this many seconds; the same command continues (0: none)")
    # the drafter
    pr.add_argument("--drafter", default=None, help="a trained drafter's checkpoint directory (else one is trained)")
    pr.add_argument("--conversations", type=int, default=2000, help="ShareGPT conversations to train on")
    pr.add_argument("--train-steps", type=int, default=300)
    pr.add_argument("--train-batch", type=int, default=16)
    pr.add_argument("--train-budget-s", type=float, default=400,
                    help="training stops with a checkpoint this many seconds after the command's start (0: none)")
    pr.add_argument("--labels", default="target", choices=["data", "target"])
    pr.add_argument("--heads", type=int, default=4)
    pr.add_argument("--seq-len", type=int, default=1024)
    pr.add_argument("--lr", type=float, default=1e-3)
    pr.add_argument("--heldout", type=int, default=32)
    pr.add_argument("--cache-gb", type=float, default=8.0)
    pr.add_argument("--amphista", nargs="*", default=[], metavar="KEY=VALUE", help="Amphista settings (as in bench_draft.py)")
    # the servers
    pr.add_argument("--dtype", default="bfloat16", help="model.dtype of the load-tested servers")
    pr.add_argument("--tree", default="auto:64", help="draft.tree of the speculative servers")
    pr.add_argument("--max-batch", type=int, default=16, help="serve.max_batch (0: leave serve.max_batch/max_queue out)")
    pr.add_argument("--max-queue", type=int, default=512)
    pr.add_argument("--max-len", type=int, default=2048)
    pr.add_argument("--server-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="another Hydra override for every server (repeatable; last, so it wins)")
    pr.add_argument("--port", type=int, default=0, help="0: a free port per server")
    pr.add_argument("--startup-timeout-s", type=float, default=300)
    pr.add_argument("--stop-timeout-s", type=float, default=60)
    pr.add_argument("--request-timeout-s", type=float, default=600)
    # the load
    pr.add_argument("--concurrency", default="1,4,16,64")
    pr.add_argument("--requests-per-level", type=int, default=0, help="0: max(16, 2 x concurrency)")
    pr.add_argument("--max-tokens", type=int, default=256)
    pr.add_argument("--warmup", type=int, default=2, help="warm-up requests per level (at least the batch in use)")
    pr.add_argument("--warmup-tokens", type=int, default=32)
    # identity
    pr.add_argument("--identity-requests", type=int, default=64, help="0: no identity check")
    pr.add_argument("--identity-tokens", type=int, default=128)
    pr.add_argument("--identity-dtype", default="float32")
    args = p.parse_args()
    sys.exit(run(args))


if __name__ == "__main__":
    main()
