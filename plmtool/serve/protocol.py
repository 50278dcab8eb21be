"""Request validation and response bodies in the OpenAI API's shapes.

Requests are validated by hand (not by pydantic models) so that every problem becomes an
OpenAI-style error body naming the offending parameter:
`{"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}`.
Nothing in here lets a Python exception escape for a bad request: every check raises `APIError`.

Parameters this server does not implement are refused when set to anything but their default,
so that a client never gets an answer that silently ignored what it asked for. Keys this module
does not know are accepted, because OpenAI clients send extra keys.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_N = 128
MAX_STOP = 4
MAX_TOKEN_ID = 2**31 - 1
MAX_SEED = 2**64 - 1  # torch generators take at most 64-bit seeds
# Dividing logits by a tiny temperature overflows to inf/nan; vLLM treats temperatures below
# 1e-5 as greedy decoding, and so do we.
GREEDY_BELOW = 1e-5
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        if type_ is None:
            type_ = "server_error" if status >= 500 else "invalid_request_error"
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return APIError(status, message, param, code).body()


def unauthorized() -> APIError:
    return APIError(401, "invalid or missing API key", None, "invalid_api_key", "authentication_error")


def queue_full(limit: int) -> APIError:
    return APIError(429, f"the server is busy ({limit} requests already waiting); retry later", None,
                    "rate_limit_exceeded", "rate_limit_error")


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", None, "shutting_down", "server_error")


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"the request did not finish within {seconds:g} seconds", None, "timeout", "timeout")


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param, "invalid_value")


def _wrong_type(param: str, message: str) -> APIError:
    return APIError(400, message, param, "invalid_type")


def _missing(param: str) -> APIError:
    return APIError(400, f"'{param}' is required", param, "missing_required_parameter")


def _unsupported(param: str, hint: str) -> APIError:
    return APIError(400, f"'{param}' is not supported by this server ({hint})", param, "unsupported_parameter")


def _short(v: Any) -> str:
    """A client's value quoted in a one-line message, cut short so the message stays readable."""
    try:
        r = repr(v)
    except ValueError:  # an integer too long for Python to print
        return "a very large integer"
    return r if len(r) <= 40 else r[:37] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not an integer


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# The raw body


def parse_json_body(raw: bytes, max_bytes: int) -> Any:
    """Decode a request body; too large, not UTF-8, malformed or too deep bodies become APIErrors."""
    if len(raw) > max_bytes:
        raise APIError(413, f"request body is larger than the {max_bytes / 2**20:g} MB limit", None,
                       "request_too_large")
    try:
        # Decoding here (not in json.loads) refuses UTF-16/32 bodies, which json.loads would guess.
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "request body is not valid UTF-8", None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", None, "invalid_json") from None
    except ValueError as e:  # JSONDecodeError, and integers longer than Python converts
        raise APIError(400, f"request body is not valid JSON: {e}", None, "invalid_json") from None


# ---------------------------------------------------------------------------------------------
# The request


@dataclass
class Request:
    kind: str  # "completion" | "chat"
    model: str
    prompts: list[str | list[int]] | None = None  # completions: one entry per prompt, text or token ids
    messages: list[dict[str, str]] | None = None  # chat: {"role", "content"} with string content
    max_tokens: int | None = None
    temperature: float = 1.0  # 0.0 means greedy
    top_p: float = 1.0
    n: int = 1  # choices per prompt
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    include_usage: bool = False  # stream a final usage chunk; non-streamed bodies always carry usage

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def choice_count(self) -> int:
        return len(self.prompts or [None]) * self.n


def parse_request(body: Any, kind: str) -> Request:
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", None, "invalid_json")
    req = Request(kind=kind, model=_model(body))
    if kind == "completion":
        req.prompts = _prompts(body.get("prompt"))
    else:
        req.messages = _messages(body.get("messages"))
    req.max_tokens = _max_tokens(body)
    req.temperature = _temperature(body.get("temperature"))
    req.top_p = _top_p(body.get("top_p"))
    req.n = _n(body.get("n"))
    req.stream = _bool(body, "stream")
    req.include_usage = _include_usage(body.get("stream_options"))
    req.stop = _stop(body.get("stop"))
    req.seed = _seed(body.get("seed"))
    _refuse_unsupported(body, req.n)
    return req


def _model(body: dict) -> str:
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str) or not model:
        raise _wrong_type("model", "'model' must be a non-empty string")
    return model


def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms: a string, strings, token ids, or lists of token ids."""
    if prompt is None:
        raise _missing("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list):
        raise _wrong_type("prompt", "'prompt' must be a string, a list of strings, a list of token ids "
                                    "or a list of token-id lists")
    if not prompt:
        raise _invalid("prompt", "'prompt' must not be an empty list")
    if all(_is_int(t) for t in prompt):  # one prompt given as token ids
        return [_token_ids(prompt, "prompt")]
    if all(isinstance(p, str) for p in prompt):
        for i, p in enumerate(prompt):
            if not p:
                raise _invalid(f"prompt[{i}]", f"prompt[{i}] is an empty string")
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [_token_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise _wrong_type("prompt", "'prompt' mixes strings, token ids and lists; use one form")


def _token_ids(ids: list, param: str) -> list[int]:
    if not ids:
        raise _invalid(param, f"{param} is an empty list of token ids")
    for i, t in enumerate(ids):
        if not _is_int(t):
            raise _wrong_type(f"{param}[{i}]", f"{param}[{i}] must be a token id (an integer)")
        if not 0 <= t <= MAX_TOKEN_ID:
            raise _invalid(f"{param}[{i}]", f"{param}[{i}] = {_short(t)} is not a valid token id")
    return list(ids)


def _messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list) or not messages:
        raise _wrong_type("messages", "'messages' must be a non-empty list")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _message(m: Any, where: str) -> dict[str, str]:
    if not isinstance(m, dict):
        raise _wrong_type(where, f"{where} must be an object with 'role' and 'content'")
    role = m.get("role")
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise _invalid(f"{where}.role",
                       f"{where}.role must be system, developer, user or assistant, got {_short(role)}")
    # Tool calls are not implemented: a conversation carrying them could not be continued faithfully.
    for key in ("tool_calls", "function_call"):
        if m.get(key):
            raise _unsupported(f"{where}.{key}", "tool calls are not implemented")
    if "content" not in m:
        raise _missing(f"{where}.content")
    return {"role": CHAT_ROLES[role], "content": _content(m["content"], f"{where}.content")}


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:  # only assistant messages that make tool calls have no content
        raise _wrong_type(where, f"{where} is null; tool calls are not supported, so content must be text")
    if not isinstance(content, list):
        raise _wrong_type(where, f"{where} must be a string or a list of text parts")
    return "".join(_text_part(p, f"{where}[{j}]") for j, p in enumerate(content))


def _text_part(part: Any, where: str) -> str:
    if not isinstance(part, dict):
        raise _wrong_type(where, f"{where} must be an object like {{\"type\": \"text\", \"text\": ...}}")
    if part.get("type") != "text":  # dropping an image or audio part would answer a different question
        raise _invalid(f"{where}.type",
                       f"only text content parts are supported, {where}.type is {_short(part.get('type'))}")
    text = part.get("text")
    if not isinstance(text, str):
        raise _wrong_type(f"{where}.text", f"{where}.text must be a string")
    return text


def _max_tokens(body: dict) -> int | None:
    limit = None
    for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are given
        v = body.get(name)
        if v is None:
            continue
        if not _is_int(v):
            raise _wrong_type(name, f"'{name}' must be an integer, got {type(v).__name__}")
        if v < 1:
            raise _invalid(name, f"'{name}' must be at least 1, got {_short(v)}")
        limit = v
    return limit


def _number(v: Any, name: str) -> int | float:
    if not _is_number(v):
        raise _wrong_type(name, f"'{name}' must be a number, got {type(v).__name__}")
    return v


def _temperature(v: Any) -> float:
    if v is None:
        return 1.0
    # Range first: float() of a huge JSON integer would overflow.
    if not 0.0 <= _number(v, "temperature") <= 2.0:  # also false for NaN
        raise _invalid("temperature", f"'temperature' must be between 0 and 2, got {_short(v)}")
    return 0.0 if v < GREEDY_BELOW else float(v)


def _top_p(v: Any) -> float:
    if v is None:
        return 1.0
    if not 0.0 < _number(v, "top_p") <= 1.0:
        raise _invalid("top_p", f"'top_p' must be greater than 0 and at most 1, got {_short(v)}")
    return float(v)


def _int_between(v: Any, name: str, lo: int, hi: int, hi_text: str | None = None) -> int:
    """An integer (not a bool) in [lo, hi]; `hi_text` spells the bound in the message."""
    if not _is_int(v):
        raise _wrong_type(name, f"'{name}' must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _invalid(name, f"'{name}' must be between {lo} and {hi_text or hi}, got {_short(v)}")
    return v


def _n(v: Any) -> int:
    return 1 if v is None else _int_between(v, "n", 1, MAX_N)


def _bool(body: dict, key: str, name: str | None = None) -> bool:
    """body[key] as a bool (null: false); `name`: what errors call it (default: the key)."""
    name = name or key
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _wrong_type(name, f"'{name}' must be a boolean")
    return v


def _include_usage(opts: Any) -> bool:
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _wrong_type("stream_options", "'stream_options' must be an object")
    return _bool(opts, "include_usage", "stream_options.include_usage")


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise _wrong_type("stop", f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them")
    return list(stop)


def _seed(v: Any) -> int | None:
    return None if v is None else _int_between(v, "seed", 0, MAX_SEED, "2**64 - 1")


def _refuse_unsupported(body: dict, n: int) -> None:
    """Refuse parameters we do not implement unless they hold their do-nothing value."""
    checks = [
        ("logprobs", lambda v: v is False, "only false or null"),
        ("top_logprobs", lambda v: _is_int(v) and v == 0, "only 0 or null"),
        ("echo", lambda v: v is False, "only false or null"),
        ("best_of", lambda v: _is_int(v) and v in (1, n), "only 1 or n"),
        ("suffix", lambda v: v == "", "only null or an empty string"),
        ("presence_penalty", lambda v: _is_number(v) and v == 0, "only 0"),
        ("frequency_penalty", lambda v: _is_number(v) and v == 0, "only 0"),
        ("logit_bias", lambda v: v == {}, "only an empty object"),
        ("tools", lambda v: v == [], "tool calls are not implemented"),
        ("functions", lambda v: v == [], "function calls are not implemented"),
        ("tool_choice", lambda v: v == "none", "only \"none\""),
        ("function_call", lambda v: v == "none", "only \"none\""),
        ("response_format", lambda v: isinstance(v, dict) and v.get("type") == "text", "only type \"text\""),
    ]
    for name, is_default, hint in checks:
        v = body.get(name)
        if v is not None and not is_default(v):
            raise _unsupported(name, hint)


# ---------------------------------------------------------------------------------------------
# Response bodies


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def choice_index(prompt_index: int, j: int, n: int) -> int:
    """OpenAI numbers the choices of several prompts prompt by prompt: prompt i's j-th is i * n + j."""
    return prompt_index * n + j


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _object(req: Request, chunk: bool) -> str:
    if req.kind == "completion":
        return "text_completion"  # OpenAI streams completions with the same object name
    return "chat.completion.chunk" if chunk else "chat.completion"


def _envelope(req: Request, rid: str, model_id: str, chunk: bool, choices: list[dict]) -> dict[str, Any]:
    return {"id": rid, "object": _object(req, chunk), "created": int(time.time()), "model": model_id,
            "choices": choices}


def _choice(req: Request, c: dict) -> dict[str, Any]:
    if req.kind == "completion":
        return {"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"], "logprobs": None}
    return {"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
            "finish_reason": c["finish_reason"], "logprobs": None}


def completion_body(req: Request, rid: str, model_id: str, choices: list[dict], usage: dict,
                    spec: dict | None) -> dict[str, Any]:
    """A whole response; each choice is {"index", "text", "finish_reason"}, rendered in index order."""
    ordered = sorted(choices, key=lambda c: c["index"])
    body = _envelope(req, rid, model_id, False, [_choice(req, c) for c in ordered])
    body["usage"] = usage
    if spec is not None:
        body["speculative"] = spec
    return body


def chunk_body(req: Request, rid: str, model_id: str, index: int, text: str | None, finish: str | None,
               first: bool = False) -> dict[str, Any]:
    """One streamed event for one choice; chat deltas carry the role on the choice's first chunk."""
    if req.kind == "completion":
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    else:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    return _envelope(req, rid, model_id, True, [choice])


def usage_chunk(req: Request, rid: str, model_id: str, usage: dict, spec: dict | None = None) -> dict[str, Any]:
    """The last streamed event when stream_options.include_usage is set: no choices, the usage."""
    body = _envelope(req, rid, model_id, True, [])
    body["usage"] = usage
    if spec is not None:
        body["speculative"] = spec
    return body
