"""OpenAI request validation and response bodies, without a model or HTTP."""

from __future__ import annotations

import json

import pytest

from plmtool.serve.protocol import (
    APIError,
    Request,
    choice_index,
    chunk_body,
    completion_body,
    error_body,
    new_id,
    parse_json_body,
    parse_request,
    queue_full,
    shutting_down,
    timed_out,
    unauthorized,
    usage_chunk,
    usage_of,
)

MB = 2**20


def completion(**kw) -> Request:
    return parse_request({"model": "m", "prompt": "hi", **kw}, "completion")


def chat(messages=None, **kw) -> Request:
    return parse_request({"model": "m", "messages": messages or [{"role": "user", "content": "hi"}], **kw}, "chat")


def refused(body: dict, kind: str = "completion") -> APIError:
    """The APIError that parse_request raises for body; a bad request is always a 4xx APIError."""
    with pytest.raises(APIError) as e:
        parse_request(body, kind)
    assert 400 <= e.value.status < 500
    assert "\n" not in e.value.message
    return e.value


def refused_completion(**kw) -> APIError:
    return refused({"model": "m", "prompt": "hi", **kw})


def refused_chat(messages=None, **kw) -> APIError:
    return refused({"model": "m", "messages": messages or [{"role": "user", "content": "hi"}], **kw}, "chat")


# --- parse_json_body ---------------------------------------------------------------------------


def test_json_body_parses():
    assert parse_json_body(b'{"model": "m", "prompt": "hi"}', MB) == {"model": "m", "prompt": "hi"}
    assert parse_json_body("{\"p\": \"é\"}".encode(), MB) == {"p": "é"}


def test_json_body_over_the_limit_is_413():
    raw = b'{"prompt": "' + b"x" * MB + b'"}'
    with pytest.raises(APIError) as e:
        parse_json_body(raw, MB)
    assert e.value.status == 413 and e.value.code == "request_too_large"
    assert "1 MB" in e.value.message
    assert parse_json_body(raw, 2 * MB)["prompt"] == "x" * MB  # the limit, not the content, refused it
    with pytest.raises(APIError) as e:
        parse_json_body(b"[1]", 2)
    assert e.value.status == 413
    assert parse_json_body(b"[1]", 3) == [1]  # exactly at the limit is fine


@pytest.mark.parametrize("raw", [
    b"{not json",
    b"",
    b'{"a": 1',
    "{\"a\": 1}".encode("utf-16"),  # json.loads alone would guess this encoding
    b'{"a": "\xff\xfe"}',
    b"[" * 100_000,  # json.loads raises RecursionError
    b'{"n": 1' + b"0" * 5000 + b"}",  # longer than Python converts to an int: ValueError
])
def test_json_body_malformed_is_400(raw):
    with pytest.raises(APIError) as e:
        parse_json_body(raw, 10 * MB)
    assert e.value.status == 400 and e.value.code == "invalid_json"
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_json_body_nested_too_deeply_says_so():
    with pytest.raises(APIError) as e:
        parse_json_body(b"[" * 100_000, 10 * MB)
    assert e.value.message == "request body is nested too deeply"
    with pytest.raises(APIError) as e:
        parse_json_body(b'{"a": "\xff"}', MB)
    assert "UTF-8" in e.value.message


def test_body_must_be_an_object():
    for body in ([], "x", 3, None):
        e = refused(body)
        assert e.status == 400 and e.code == "invalid_json"


# --- the error envelope ------------------------------------------------------------------------


def test_error_envelope():
    e = APIError(400, "bad", "top_p", "invalid_value")
    assert e.body() == {"error": {"message": "bad", "type": "invalid_request_error", "param": "top_p",
                                  "code": "invalid_value"}}
    assert error_body(404, "nope", code="not_found") == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": None, "code": "not_found"}}
    assert error_body(500, "boom")["error"]["type"] == "server_error"


@pytest.mark.parametrize("err, status, type_, code", [
    (unauthorized(), 401, "authentication_error", "invalid_api_key"),
    (queue_full(8), 429, "rate_limit_error", "rate_limit_exceeded"),
    (shutting_down(), 503, "server_error", "shutting_down"),
    (timed_out(30), 504, "timeout", "timeout"),
])
def test_error_factories(err, status, type_, code):
    assert isinstance(err, APIError)
    assert err.status == status
    body = err.body()["error"]
    assert (body["type"], body["code"], body["param"]) == (type_, code, None)
    assert body["message"] and "\n" not in body["message"]


def test_error_factories_name_their_numbers():
    assert "8" in queue_full(8).message
    assert "30" in timed_out(30).message
    assert "2.5" in timed_out(2.5).message


# --- model and defaults ------------------------------------------------------------------------


def test_defaults():
    req = completion()
    assert req == Request(kind="completion", model="m", prompts=["hi"])
    assert (req.max_tokens, req.temperature, req.top_p, req.n, req.stream, req.stop, req.seed) == (
        None, 1.0, 1.0, 1, False, [], None)
    assert req.include_usage is False
    assert not req.greedy
    assert req.choice_count == 1


def test_model_is_required():
    e = refused({"prompt": "hi"})
    assert (e.param, e.code) == ("model", "missing_required_parameter")
    for model in ("", 3, ["m"]):
        e = refused({"model": model, "prompt": "hi"})
        assert (e.param, e.code) == ("model", "invalid_type")


def test_unknown_keys_and_harmless_parameters_are_accepted():
    req = completion(user="u", metadata={"a": "b"}, store=False, service_tier="auto", parallel_tool_calls=True,
                     some_future_key={"x": 1})
    assert req.prompts == ["hi"]
    assert chat(user="u", store=True, parallel_tool_calls=False).messages == [{"role": "user", "content": "hi"}]


# --- prompts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, prompts", [
    ("hi", ["hi"]),
    (["hi"], ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([0, 2**31 - 1], [[0, 2**31 - 1]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms(prompt, prompts):
    assert completion(prompt=prompt).prompts == prompts


@pytest.mark.parametrize("prompt, param, code", [
    (None, "prompt", "missing_required_parameter"),
    ([], "prompt", "invalid_value"),
    ("", "prompt[0]", "invalid_value"),
    (["a", ""], "prompt[1]", "invalid_value"),
    ([[1], []], "prompt[1]", "invalid_value"),
    ([1, -1], "prompt[1]", "invalid_value"),
    ([2**31], "prompt[0]", "invalid_value"),
    ([[5, 2**31]], "prompt[0][1]", "invalid_value"),
    ([[1, "a"]], "prompt[0][1]", "invalid_type"),
    ([[1, True]], "prompt[0][1]", "invalid_type"),
    ([[1.0]], "prompt[0][0]", "invalid_type"),
    ([[[1]]], "prompt[0][0]", "invalid_type"),
    (["a", 1], "prompt", "invalid_type"),
    ([1, "a"], "prompt", "invalid_type"),
    ([[1], "a"], "prompt", "invalid_type"),
    ([True, False], "prompt", "invalid_type"),
    (3, "prompt", "invalid_type"),
    ({"text": "hi"}, "prompt", "invalid_type"),
])
def test_bad_prompts(prompt, param, code):
    body = {"model": "m"} if prompt is None else {"model": "m", "prompt": prompt}
    e = refused(body)
    assert (e.status, e.param, e.code) == (400, param, code)


# --- chat messages -----------------------------------------------------------------------------


def test_messages_roles_and_text_parts():
    req = chat([
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": "sys", "name": "ops"},
        {"role": "user", "name": "ann",
         "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": []},
    ])
    assert req.prompts is None
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": ""},
    ]


@pytest.mark.parametrize("messages, param, code", [
    (None, "messages", "missing_required_parameter"),
    ([], "messages", "invalid_type"),
    ("hi", "messages", "invalid_type"),
    (["hi"], "messages[0]", "invalid_type"),
    ([{"content": "hi"}], "messages[0].role", "invalid_value"),
    ([{"role": "tool", "content": "x", "tool_call_id": "1"}], "messages[0].role", "invalid_value"),
    ([{"role": ["user"], "content": "x"}], "messages[0].role", "invalid_value"),
    ([{"role": "user"}], "messages[0].content", "missing_required_parameter"),
    ([{"role": "user", "content": 5}], "messages[0].content", "invalid_type"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], "messages[1].content", "invalid_type"),
    ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]", "invalid_type"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": 5}]}],
     "messages[0].content[1].text", "invalid_type"),
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text", "invalid_type"),
    ([{"role": "user", "content": [{"text": "a"}]}], "messages[0].content[0].type", "invalid_value"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None,
                                         "tool_calls": [{"id": "1", "type": "function"}]}],
     "messages[1].tool_calls", "unsupported_parameter"),
])
def test_bad_messages(messages, param, code):
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    e = refused(body, "chat")
    assert (e.status, e.param, e.code) == (400, param, code)


def test_non_text_parts_are_refused_not_dropped():
    e = refused_chat([{"role": "system", "content": "s"},
                      {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                   {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert e.param == "messages[1].content[1].type"
    assert "only text content parts are supported" in e.message


def test_content_null_names_tool_calls():
    e = refused_chat([{"role": "assistant", "content": None}])
    assert "tool calls are not supported" in e.message


# --- sampling parameters -----------------------------------------------------------------------


@pytest.mark.parametrize("t, stored", [(0, 0.0), (0.0, 0.0), (1e-300, 0.0), (5e-324, 0.0), (9.9e-6, 0.0),
                                       (1e-5, 1e-5), (0.7, 0.7), (1, 1.0), (2, 2.0), (None, 1.0)])
def test_temperature(t, stored):
    req = completion(temperature=t)
    assert req.temperature == stored and isinstance(req.temperature, float)
    assert req.greedy == (stored == 0.0)


@pytest.mark.parametrize("t, code", [(-0.1, "invalid_value"), (2.01, "invalid_value"), (float("nan"), "invalid_value"),
                                     (float("inf"), "invalid_value"), (10**400, "invalid_value"),
                                     ("0.5", "invalid_type"), (True, "invalid_type")])
def test_bad_temperature(t, code):
    e = refused_completion(temperature=t)
    assert (e.param, e.code) == ("temperature", code)


def test_temperature_from_json_text():
    # The same values as they arrive over HTTP, including JSON's non-standard NaN.
    assert completion(**parse_json_body(b'{"temperature": 1e-300}', MB)).temperature == 0.0
    for raw in (b'{"temperature": NaN}', b'{"temperature": 1e400}', b'{"temperature": 1' + b"0" * 400 + b"}"):
        assert refused_completion(**parse_json_body(raw, MB)).param == "temperature"


@pytest.mark.parametrize("p", [1e-9, 0.5, 1, 1.0])
def test_top_p(p):
    assert completion(top_p=p).top_p == float(p)


@pytest.mark.parametrize("p", [0, 0.0, -0.5, 1.0001, float("nan"), "1", False])
def test_bad_top_p(p):
    assert refused_completion(top_p=p).param == "top_p"


@pytest.mark.parametrize("n", [1, 2, 128, None])
def test_n(n):
    assert completion(n=n).n == (n or 1)
    assert chat(n=n).n == (n or 1)


@pytest.mark.parametrize("n, code", [(0, "invalid_value"), (-1, "invalid_value"), (129, "invalid_value"),
                                     (2.0, "invalid_type"), ("2", "invalid_type"), (True, "invalid_type")])
def test_bad_n(n, code):
    e = refused_completion(n=n)
    assert (e.status, e.param, e.code) == (400, "n", code)


def test_choice_count():
    assert completion(prompt=["a", "b", "c"], n=4).choice_count == 12
    assert chat(n=3).choice_count == 3


@pytest.mark.parametrize("seed", [0, 1, 2**63, 2**64 - 1, None])
def test_seed(seed):
    assert completion(seed=seed).seed == seed


@pytest.mark.parametrize("seed, code", [(2**64, "invalid_value"), (-1, "invalid_value"), (10**30, "invalid_value"),
                                        (True, "invalid_type"), (1.5, "invalid_type"), ("7", "invalid_type")])
def test_bad_seed(seed, code):
    e = refused_completion(seed=seed)
    assert (e.status, e.param, e.code) == (400, "seed", code)


def test_max_tokens():
    assert completion(max_tokens=5).max_tokens == 5
    assert chat(max_completion_tokens=7).max_tokens == 7
    assert chat(max_tokens=5, max_completion_tokens=7).max_tokens == 7
    assert completion(max_tokens=None).max_tokens is None
    for name in ("max_tokens", "max_completion_tokens"):
        for v, code in ((0, "invalid_value"), (-3, "invalid_value"), (5.0, "invalid_type"), ("5", "invalid_type"),
                        (True, "invalid_type")):
            e = refused_completion(**{name: v})
            assert (e.param, e.code) == (name, code)


def test_stop():
    assert completion(stop="\n").stop == ["\n"]
    assert completion(stop=["a", "b", "c", "d"]).stop == ["a", "b", "c", "d"]
    assert completion(stop=[]).stop == []
    assert completion(stop=None).stop == []
    for stop in ("", ["a", ""], ["a", "b", "c", "d", "e"], [1], 5, {"a": 1}):
        assert refused_completion(stop=stop).param == "stop"


def test_stream_and_include_usage():
    assert completion(stream=True).stream is True
    assert completion(stream=True).include_usage is False  # OpenAI sends usage only when asked
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage is True
    assert chat(stream=True, stream_options={"include_usage": False}).include_usage is False
    assert chat(stream=True, stream_options={}).include_usage is False
    assert chat(stream=True, stream_options=None).include_usage is False
    assert refused_completion(stream="yes").param == "stream"
    assert refused_completion(stream=1).param == "stream"
    assert refused_completion(stream_options=[True]).param == "stream_options"
    for v in (1, "true"):
        e = refused_completion(stream=True, stream_options={"include_usage": v})
        assert (e.param, e.code) == ("stream_options.include_usage", "invalid_type")


# --- parameters this server does not implement -------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("logprobs", True),
    ("logprobs", 0),
    ("logprobs", 5),
    ("top_logprobs", 3),
    ("echo", True),
    ("best_of", 3),
    ("suffix", "end"),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1),
    ("logit_bias", {"50256": -100}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("functions", [{"name": "f"}]),
    ("tool_choice", "auto"),
    ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
    ("response_format", "json"),
])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_unsupported_parameters_are_refused(kind, name, value):
    e = refused_completion(**{name: value}) if kind == "completion" else refused_chat(**{name: value})
    assert (e.status, e.param, e.code) == (400, name, "unsupported_parameter")
    assert e.message.startswith(f"'{name}' is not supported by this server")


@pytest.mark.parametrize("name, value", [
    ("logprobs", None),
    ("logprobs", False),
    ("top_logprobs", None),
    ("top_logprobs", 0),
    ("echo", False),
    ("best_of", None),
    ("best_of", 1),
    ("suffix", None),
    ("suffix", ""),
    ("presence_penalty", 0),
    ("presence_penalty", 0.0),
    ("frequency_penalty", 0),
    ("logit_bias", None),
    ("logit_bias", {}),
    ("tools", []),
    ("functions", None),
    ("tool_choice", "none"),
    ("tool_choice", None),
    ("function_call", "none"),
    ("response_format", {"type": "text"}),
    ("response_format", None),
])
@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_default_values_of_unsupported_parameters_are_accepted(kind, name, value):
    req = completion(**{name: value}) if kind == "completion" else chat(**{name: value})
    assert req.kind == kind


def test_best_of_equal_to_n_is_accepted():
    assert completion(n=3, best_of=3).n == 3
    assert refused_completion(n=3, best_of=4).param == "best_of"
    assert refused_completion(best_of=True).param == "best_of"


# --- response bodies ---------------------------------------------------------------------------


def test_new_id():
    a, b = new_id("cmpl"), new_id("cmpl")
    assert a.startswith("cmpl-") and a != b


def test_usage_of():
    assert usage_of(7, 3) == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_choice_index_orders_prompt_by_prompt():
    n = 3
    indices = [choice_index(i, j, n) for i in range(2) for j in range(n)]
    assert indices == [0, 1, 2, 3, 4, 5]
    assert choice_index(1, 0, 2) == 2 and choice_index(0, 1, 2) == 1
    assert choice_index(0, 0, 1) == 0 and choice_index(4, 0, 1) == 4


CHOICES = [{"index": 1, "text": "second", "finish_reason": "length"},
           {"index": 0, "text": "first", "finish_reason": "stop"}]


def test_completion_body_two_choices():
    req = completion(n=2)
    usage = usage_of(2, 5)
    body = completion_body(req, "cmpl-1", "tiny", CHOICES, usage, {"accepted": 3})
    assert body["id"] == "cmpl-1" and body["object"] == "text_completion" and body["model"] == "tiny"
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": "first", "finish_reason": "stop", "logprobs": None},
        {"index": 1, "text": "second", "finish_reason": "length", "logprobs": None},
    ]
    assert body["usage"] == usage and body["speculative"] == {"accepted": 3}
    json.dumps(body)


def test_chat_body_two_choices():
    req = chat(n=2)
    body = completion_body(req, "chatcmpl-1", "tiny", CHOICES, usage_of(4, 5), None)
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "first"}, "finish_reason": "stop", "logprobs": None},
        {"index": 1, "message": {"role": "assistant", "content": "second"}, "finish_reason": "length",
         "logprobs": None},
    ]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert "speculative" not in body


def test_completion_chunks():
    req = completion(stream=True, n=2)
    c = chunk_body(req, "cmpl-1", "tiny", 1, "abc", None)
    assert c["object"] == "text_completion" and c["id"] == "cmpl-1" and c["model"] == "tiny"
    assert c["choices"] == [{"index": 1, "text": "abc", "finish_reason": None, "logprobs": None}]
    end = chunk_body(req, "cmpl-1", "tiny", 0, None, "stop")
    assert end["choices"] == [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]


def test_chat_chunks():
    req = chat(stream=True, n=2)
    first = chunk_body(req, "c-1", "tiny", 1, "He", None, first=True)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"] == [{"index": 1, "delta": {"role": "assistant", "content": "He"}, "finish_reason": None,
                                 "logprobs": None}]
    opening = chunk_body(req, "c-1", "tiny", 0, None, None, first=True)
    assert opening["choices"][0]["delta"] == {"role": "assistant"}
    more = chunk_body(req, "c-1", "tiny", 1, "llo", None)
    assert more["choices"][0]["delta"] == {"content": "llo"}
    end = chunk_body(req, "c-1", "tiny", 1, None, "length")
    assert end["choices"] == [{"index": 1, "delta": {}, "finish_reason": "length", "logprobs": None}]


def test_usage_chunk():
    usage = usage_of(3, 4)
    tail = usage_chunk(chat(stream=True), "c-1", "tiny", usage)
    assert tail["object"] == "chat.completion.chunk" and tail["choices"] == [] and tail["usage"] == usage
    assert "speculative" not in tail
    tail = usage_chunk(completion(stream=True), "cmpl-1", "tiny", usage, {"accepted": 2})
    assert tail["object"] == "text_completion" and tail["choices"] == []
    assert tail["usage"] == usage and tail["speculative"] == {"accepted": 2}
