"""The FastAPI app: /health, /v1/models, /v1/completions, /v1/chat/completions (+ SSE streaming).

One engine decodes one request at a time (batch 1 keeps speculation lossless and simple):
requests queue on a lock, so concurrent clients are all answered, one after the other. Each
response carries `speculative` statistics (steps, accepted tokens per step).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterator

from starlette.requests import Request as HTTPRequest  # module level: FastAPI resolves annotations here

from plmtool.draft.decoding.engine import GenerationConfig, SpeculativeEngine
from plmtool.errors import PlmtoolError
from plmtool.serve.protocol import APIError, Request, chunk_body, completion_body, new_id, parse_request


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


class Server:
    def __init__(self, engine: SpeculativeEngine, tokenizer, model_id: str, max_tokens_default: int = 256,
                 acceptance: str = "lossless", typical_epsilon: float = 0.09, stop_token_ids: list[int] | None = None,
                 drafter_kind: str | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_tokens_default = max_tokens_default
        self.acceptance = acceptance
        self.typical_epsilon = typical_epsilon
        self.stop_token_ids = stop_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        self.drafter_kind = drafter_kind
        self.lock = threading.Lock()
        self.served = 0
        self.started = time.time()

    # ------------------------------------------------------------------ request -> generation
    def prompt_ids(self, req: Request) -> list[int]:
        if req.kind == "completion":
            return self.tokenizer(req.prompt)["input_ids"]
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages", "no_chat_template")
        text = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prepare(self, req: Request) -> tuple[list[int], GenerationConfig]:
        if req.model != self.model_id:
            raise APIError(404, f"model '{req.model}' does not exist; this server serves '{self.model_id}'", "model",
                           "model_not_found")
        ids = self.prompt_ids(req)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt" if req.kind == "completion" else "messages", "invalid_value")
        reserve = self.engine.tree.n if self.engine.tree is not None else 1
        room = self.engine.max_len - len(ids) - reserve
        max_tokens = req.max_tokens if req.max_tokens is not None else min(self.max_tokens_default, room)
        try:
            if max_tokens < 1:
                raise PlmtoolError(f"the prompt ({len(ids)} tokens) leaves no room in the context of {self.engine.max_len} tokens")
            self.engine.check_request(len(ids), max_tokens)
        except PlmtoolError as e:
            raise APIError(400, str(e), "max_tokens", "context_length_exceeded") from None
        gen = GenerationConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                               acceptance=self.acceptance, typical_epsilon=self.typical_epsilon,
                               stop_token_ids=self.stop_token_ids, seed=req.seed)
        return ids, gen

    def spec_stats(self, result) -> dict[str, Any]:
        return {"mode": "speculative" if self.engine.speculative else "plain", "drafter": self.drafter_kind,
                "tree_nodes": self.engine.tree.n if self.engine.tree is not None else 1,
                "acceptance": self.acceptance if self.engine.speculative else None, **result.stats()}

    def _generate(self, ids: list[int], gen: GenerationConfig, stops: list[str]) -> Iterator[tuple[str, Any, TextAssembler]]:
        """Yields text deltas while holding the engine lock."""
        text = TextAssembler(self.tokenizer, stops)
        with self.lock:
            result = None
            stream = self.engine.stream(ids, gen)
            try:
                for _, result in stream:
                    delta = text.feed(result.tokens)
                    yield delta, result, text
                    if text.stopped:
                        result.finish_reason = "stop"
                        break
            finally:
                stream.close()
            self.served += 1
        if result is not None and not text.stopped:
            yield text.finish(result.tokens), result, text

    def complete(self, req: Request) -> dict[str, Any]:
        ids, gen = self.prepare(req)
        parts, result = [], None
        for delta, result, _ in self._generate(ids, gen, req.stop):
            parts.append(delta)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(result.tokens), "total_tokens": len(ids) + len(result.tokens)}
        return completion_body(req, new_id("cmpl" if req.kind == "completion" else "chatcmpl"), self.model_id, "".join(parts),
                               result.finish_reason, usage, self.spec_stats(result))

    def stream_events(self, req: Request, ids: list[int], gen: GenerationConfig) -> Iterator[str]:
        rid = new_id("cmpl" if req.kind == "completion" else "chatcmpl")
        first, result = True, None
        for delta, result, _ in self._generate(ids, gen, req.stop):
            if delta or first:
                yield f"data: {json.dumps(chunk_body(req, rid, self.model_id, delta, None, first))}\n\n"
                first = False
        yield f"data: {json.dumps(chunk_body(req, rid, self.model_id, None, result.finish_reason))}\n\n"
        if req.include_usage:
            usage = {"prompt_tokens": len(ids), "completion_tokens": len(result.tokens), "total_tokens": len(ids) + len(result.tokens)}
            tail = {"id": rid, "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
                    "created": int(time.time()), "model": self.model_id, "choices": [], "usage": usage,
                    "speculative": self.spec_stats(result)}
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"


def create_app(server: Server):
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="plmtool draft serve", version="1")

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HTTPRequest, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    async def body_of(request: HTTPRequest) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", None, "invalid_json") from None

    @app.get("/health")
    def health():
        return {"status": "ok", "model": server.model_id, "speculative": server.engine.speculative,
                "drafter": server.drafter_kind, "requests_served": server.served, "uptime_s": round(time.time() - server.started, 1)}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": int(server.started),
                                             "owned_by": "plmtool", "max_model_len": server.engine.max_len}]}

    async def handle(request: HTTPRequest, kind: str):
        req = parse_request(await body_of(request), kind)
        if req.stream:
            ids, gen = server.prepare(req)  # errors become 4xx before the stream starts
            return StreamingResponse(server.stream_events(req, ids, gen), media_type="text/event-stream")
        return await run_in_threadpool(server.complete, req)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await handle(request, "chat")

    return app
