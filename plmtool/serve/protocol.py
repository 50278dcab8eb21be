"""Request validation and response bodies in the OpenAI API's shapes.

Requests are validated by hand (not by pydantic models) so that every problem becomes an
OpenAI-style error body naming the offending parameter:
`{"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    kind: str  # "completion" | "chat"
    model: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    include_usage: bool = True


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {type(v).__name__}", name, "invalid_type")
    if not lo <= v <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {v}", name, "invalid_value")
    return float(v)


def parse_request(body: Any, kind: str) -> Request:
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required (a string)", "model", "missing_required_parameter" if model is None else "invalid_type")
    req = Request(kind=kind, model=model)
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if prompt is None:
            raise APIError(400, "'prompt' is required", "prompt", "missing_required_parameter")
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (batched prompts are not supported)", "prompt", "invalid_type")
        req.prompt = prompt
    else:
        messages = body.get("messages")
        if messages is None:
            raise APIError(400, "'messages' is required", "messages", "missing_required_parameter")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", "messages", "invalid_type")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise APIError(400, f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role", "invalid_value")
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content", "invalid_type")
            clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        req.messages = clean
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise APIError(400, f"'{name}' must be an integer, got {type(v).__name__}", name, "invalid_type")
        if v < 1:
            raise APIError(400, f"'{name}' must be at least 1, got {v}", name, "invalid_value")
        req.max_tokens = v
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if req.top_p == 0:
        raise APIError(400, "'top_p' must be greater than 0", "top_p", "invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream", "invalid_type")
    req.stream = stream
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    req.include_usage = bool(opts.get("include_usage", True))
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop", "invalid_type")
        req.stop = stop
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", "n", "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "'seed' must be an integer", "seed", "invalid_type")
    req.seed = seed
    return req


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(req: Request, rid: str, model_id: str, text: str, finish: str, usage: dict, spec: dict) -> dict:
    created = int(time.time())
    if req.kind == "completion":
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice], "usage": usage, "speculative": spec}


def chunk_body(req: Request, rid: str, model_id: str, text: str | None, finish: str | None, first: bool = False) -> dict:
    created = int(time.time())
    if req.kind == "completion":
        return {"id": rid, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if text:
        delta["content"] = text
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
