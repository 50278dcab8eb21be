"""The FastAPI app: /health, /metrics, /v1/models, /v1/completions, /v1/chat/completions (+ SSE).

Requests never wait on a lock. The body is read with a size limit, then parsed, validated and
tokenized in a worker thread (a large prompt does not stall the event loop), and its sequences (one
per prompt and per `n`) are queued for the decoding thread (`scheduler.py`), which decodes up to
`serve.max_batch` of them together. Responses and streams await their sequences' events on the
event loop, so /health answers however many clients are waiting, a client that disconnects has its
sequences cancelled, and a full queue answers 429. Each response carries `usage` and
`speculative` statistics (steps, accepted tokens per step).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.requests import Request as HTTPRequest  # module level: FastAPI resolves annotations here

from plmtool.draft.decoding.batch import BatchEngine
from plmtool.draft.decoding.engine import GenerationConfig
from plmtool.errors import PlmtoolError
from plmtool.serve.protocol import (
    MAX_SEED, APIError, Request, choice_index, chunk_body, completion_body, new_id, parse_json_body, parse_request,
    unauthorized, usage_chunk, usage_of,
)
from plmtool.serve.scheduler import Job, Scheduler


class TextAssembler:
    """Turns the growing token list into text deltas; applies stop strings.

    Text is always re-decoded from all tokens so the streamed deltas concatenate to exactly the
    non-streamed text; a tail that could still become a stop string (or ends in an incomplete
    UTF-8 character) is held back until it is settled.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0
        self.stopped = False

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def feed(self, tokens: list[int]) -> str:
        full = self._text(tokens)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._delta(full[:cut])
        safe = len(full) - self.hold
        while safe > 0 and full[safe - 1] == "\ufffd":
            safe -= 1
        return self._delta(full[: max(safe, self.sent)])

    def finish(self, tokens: list[int]) -> str:
        full = self._text(tokens)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        return self._delta(full[:cut] if cut >= 0 else full)

    def _delta(self, upto: str) -> str:
        d = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return d


@dataclass
class Plan:
    """A validated request: its sequences in choice order and what usage counts."""

    req: Request
    choices: list[tuple[list[int], GenerationConfig]]  # index = choice index
    prompt_tokens: int


@dataclass
class ChoiceState:
    """What the response has of one choice so far."""

    text: TextAssembler
    tokens: list[int]
    accept_lengths: list[int]
    finish: str | None = None
    first: bool = True


class Server:
    def __init__(self, engine: BatchEngine, tokenizer, model_id: str, options, stop_token_ids: list[int] | None = None,
                 drafter_kind: str | None = None):
        """`options`: the `serve` config node (`ServeConfig`: defaults, limits, API key)."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.options = options
        self.stop_token_ids = stop_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        self.drafter_kind = drafter_kind
        self.scheduler = Scheduler(engine, int(options.max_queue))
        self.scheduler.start()
        self.started = time.time()
        self.http_status: dict[tuple[str, int], int] = {}  # (endpoint, status) -> responses

    @property
    def served(self) -> int:
        return self.scheduler.counters.requests

    # ------------------------------------------------------------------ request -> sequences (worker thread)
    def plan(self, raw: bytes, kind: str) -> Plan:
        """Parse, validate and tokenize a request body; every problem is an APIError."""
        req = parse_request(parse_json_body(raw, int(self.options.max_body_mb * 2**20)), kind)
        if req.model != self.model_id:
            raise APIError(404, f"model '{req.model}' does not exist; this server serves '{self.model_id}'", "model",
                           "model_not_found")
        if req.choice_count > self.options.max_queue:  # before tokenizing: it could never be queued
            raise APIError(400, f"{req.choice_count} sequences (prompts x n) exceed what the server queues "
                           f"(serve.max_queue = {self.options.max_queue})", "n", "invalid_value")
        prompts = self._prompt_ids(req)
        choices, prompt_tokens = [], 0
        for i, ids in enumerate(prompts):
            param = "prompt" if req.kind == "completion" else "messages"
            if not ids:
                raise APIError(400, "the prompt is empty", param, "invalid_value")
            reserve = self.engine.tree.n
            room = self.engine.max_len - len(ids) - reserve
            max_tokens = req.max_tokens if req.max_tokens is not None else min(self.options.max_tokens_default, room)
            try:
                if max_tokens < 1:
                    raise PlmtoolError(f"the prompt ({len(ids)} tokens) leaves no room in the context of {self.engine.max_len} tokens")
                self.engine.check_request(len(ids), max_tokens)
            except PlmtoolError as e:
                raise APIError(400, str(e), "max_tokens", "context_length_exceeded") from None
            prompt_tokens += len(ids)
            for j in range(req.n):
                # each of n choices samples with its own seed (seed + j), so they differ
                seed = None if req.seed is None else (req.seed + j) % (MAX_SEED + 1)
                gen = GenerationConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                       acceptance=self.options.acceptance, typical_epsilon=self.options.typical_epsilon,
                                       stop_token_ids=self.stop_token_ids, seed=seed)
                assert len(choices) == choice_index(i, j, req.n)
                choices.append((ids, gen))
        return Plan(req, choices, prompt_tokens)

    def _prompt_ids(self, req: Request) -> list[list[int]]:
        if req.kind == "completion":
            out = []
            vocab = self.engine.runner.vocab_size
            for i, p in enumerate(req.prompts or []):
                if isinstance(p, str):
                    out.append(self._encode(p, f"prompt[{i}]" if len(req.prompts) > 1 else "prompt"))
                    continue
                bad = next((t for t in p if t >= vocab), None)
                if bad is not None:
                    raise APIError(400, f"prompt[{i}] holds token id {bad}, outside the vocabulary of {vocab}",
                                   f"prompt[{i}]", "invalid_value")
                out.append(list(p))
            return out
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages", "no_chat_template")
        try:
            text = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template's own refusal (raise_exception: roles that must alternate, ...)
            raise APIError(400, f"the model's chat template refuses these messages: {e}", "messages", "invalid_value") from None
        return [self._encode(text, "messages", add_special_tokens=False)]

    def _encode(self, text: str, param: str, **kw) -> list[int]:
        try:
            return self.tokenizer(text, **kw)["input_ids"]
        except (UnicodeError, TypeError, ValueError) as e:  # e.g. a lone surrogate, which JSON allows
            raise APIError(400, f"'{param}' cannot be tokenized: {e}", param, "invalid_value") from None

    # ------------------------------------------------------------------ sequences -> choices (event loop)
    def submit(self, plan: Plan) -> list[Job]:
        loop = asyncio.get_running_loop()
        timeout = float(self.options.request_timeout_s or 0)
        jobs = [Job(ids, gen, loop, timeout_s=timeout) for ids, gen in plan.choices]
        self.scheduler.submit(jobs)
        return jobs

    async def choices(self, plan: Plan, jobs: list[Job]) -> AsyncIterator[tuple[int, str, ChoiceState]]:
        """(choice index, text delta, state) as tokens arrive, choice by choice in arrival order;
        a state's `finish` is set on its last delta. Raises the first job's APIError. Cancels
        every job still running when the consumer stops early (a disconnect, an error).

        Text is decoded as tokens arrive only where something needs it (a stream, stop strings);
        otherwise once at the end: decoding runs on the event loop, and re-decoding every answer
        at every step of a full batch would hold the interpreter against the decoding thread."""
        incremental = plan.req.stream or bool(plan.req.stop)
        states = [ChoiceState(TextAssembler(self.tokenizer, plan.req.stop), [], []) for _ in jobs]
        getters = {asyncio.ensure_future(job.events.get()): i for i, job in enumerate(jobs)}
        try:
            while getters:
                done, _ = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    i = getters.pop(fut)
                    kind, payload = fut.result()
                    state = states[i]
                    if kind == "error":
                        raise payload
                    if kind == "tokens":
                        if state.tokens:  # the first tokens come from the prefill, the rest from steps
                            state.accept_lengths.append(len(payload))
                        state.tokens.extend(payload)
                        if not incremental:
                            getters[asyncio.ensure_future(jobs[i].events.get())] = i
                            continue
                        delta = state.text.feed(state.tokens)
                        if state.text.stopped:  # a stop string: this choice is over, free its row
                            self.scheduler.cancel([jobs[i]])
                            state.finish = "stop"
                            yield i, delta, state
                            continue
                        yield i, delta, state
                    else:  # done
                        state.finish = payload.finish_reason
                        yield i, state.text.finish(state.tokens), state
                        continue
                    getters[asyncio.ensure_future(jobs[i].events.get())] = i
        finally:
            for fut in getters:
                fut.cancel()
            self.scheduler.cancel([job for job in jobs if not job.finished])

    def spec_stats(self, states: list[ChoiceState]) -> dict[str, Any]:
        lengths = [n for s in states for n in s.accept_lengths]
        return {"mode": "speculative" if self.engine.speculative else "plain", "drafter": self.drafter_kind,
                "tree_nodes": self.engine.tree.n, "acceptance": self.options.acceptance if self.engine.speculative else None,
                "steps": len(lengths), "mean_accepted": round(sum(lengths) / len(lengths), 4) if lengths else 1.0,
                "accept_lengths": lengths}

    def usage(self, plan: Plan, states: list[ChoiceState]) -> dict[str, int]:
        return usage_of(plan.prompt_tokens, sum(len(s.tokens) for s in states))

    async def complete(self, plan: Plan, jobs: list[Job], request: HTTPRequest) -> dict[str, Any]:
        rid = new_id("cmpl" if plan.req.kind == "completion" else "chatcmpl")
        texts = [""] * len(jobs)
        states: list[ChoiceState] = [None] * len(jobs)  # type: ignore[list-item]

        async def gather() -> None:
            async for i, delta, state in self.choices(plan, jobs):
                texts[i] += delta
                states[i] = state

        task = asyncio.ensure_future(gather())
        while True:  # a client that went away has its sequences cancelled (the row is freed)
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                break
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client closed the request", None, "client_closed")
        task.result()
        choices = [{"index": i, "text": texts[i], "finish_reason": s.finish} for i, s in enumerate(states)]
        return completion_body(plan.req, rid, self.model_id, choices, self.usage(plan, states), self.spec_stats(states))

    async def stream(self, plan: Plan, jobs: list[Job]) -> AsyncIterator[str]:
        req = plan.req
        rid = new_id("cmpl" if req.kind == "completion" else "chatcmpl")
        states: dict[int, ChoiceState] = {}
        try:
            async for i, delta, state in self.choices(plan, jobs):
                states[i] = state
                if delta or state.first:
                    yield _sse(chunk_body(req, rid, self.model_id, i, delta, None, state.first))
                    state.first = False
                if state.finish:
                    yield _sse(chunk_body(req, rid, self.model_id, i, None, state.finish))
        except APIError as e:  # the stream has started: the error is its last event
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
            return
        if req.include_usage:
            ordered = [states[i] for i in sorted(states)]
            yield _sse(usage_chunk(req, rid, self.model_id, self.usage(plan, ordered), self.spec_stats(ordered)))
        yield "data: [DONE]\n\n"

    def report(self) -> dict[str, Any]:
        c, st = self.scheduler.counters, self.engine.stats
        return {"requests_served": c.requests, "cancelled": c.cancelled, "timed_out": c.timed_out, "failed": c.failed,
                "rejected": c.rejected, "tokens": c.tokens, "engine_steps": st.steps, "sequence_steps": st.sequence_steps,
                "prefills": st.prefills, "mean_accepted": round(st.mean_accepted, 4),
                "steps_per_batch_rows": {str(k): v for k, v in sorted(st.rows.items())}}


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def read_body(request: HTTPRequest, limit_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed the limit (header or bytes read)."""
    too_large = APIError(413, f"request body is larger than the {limit_bytes / 2**20:g} MB limit", None, "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(server: Server):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from plmtool.serve.metrics import metrics_text

    @asynccontextmanager
    async def lifespan(_app):
        yield
        server.scheduler.stop()

    app = FastAPI(title="plmtool draft serve", version="1", lifespan=lifespan)

    def count(request: HTTPRequest, status: int) -> None:
        """Responses per route template (not per path: /v1/models/<anything> is one series)."""
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        server.http_status[(endpoint, status)] = server.http_status.get((endpoint, status), 0) + 1

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, exc: APIError):
        count(request, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HTTPRequest, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    def authorize(request: HTTPRequest) -> None:
        key = server.options.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise unauthorized()

    @app.get("/health")
    async def health():
        s = server.scheduler
        return {"status": "ok" if s.accepting else "stopping", "model": server.model_id,
                "speculative": server.engine.speculative, "drafter": server.drafter_kind, "requests_served": server.served,
                "running": s.running, "waiting": s.queue_length, "max_batch": server.engine.max_batch,
                "engine_error": s.error, "uptime_s": round(time.time() - server.started, 1)}

    @app.get("/metrics")
    async def metrics():
        text, content_type = metrics_text(server)
        return PlainTextResponse(text, media_type=content_type)

    def model_card() -> dict[str, Any]:
        return {"id": server.model_id, "object": "model", "created": int(server.started), "owned_by": "plmtool",
                "max_model_len": server.engine.max_len}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: HTTPRequest):
        authorize(request)
        if model_id != server.model_id:
            raise APIError(404, f"model '{model_id}' does not exist; this server serves '{server.model_id}'", "model",
                           "model_not_found")
        return model_card()

    async def handle(request: HTTPRequest, kind: str):
        authorize(request)
        raw = await read_body(request, int(server.options.max_body_mb * 2**20))
        plan = await run_in_threadpool(server.plan, raw, kind)  # JSON, validation, tokenizer: off the loop
        jobs = server.submit(plan)
        count(request, 200)
        if plan.req.stream:
            return StreamingResponse(server.stream(plan, jobs), media_type="text/event-stream")
        return await server.complete(plan, jobs, request)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await handle(request, "chat")

    return app
