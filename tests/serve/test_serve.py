"""OpenAI-compatible server over the engine, through FastAPI's TestClient."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from plmtool.draft.config import ServeConfig
from plmtool.draft.decoding.batch import BatchEngine
from plmtool.serve.app import Server, create_app
from tests.draft.decoding_helpers import perturbed_drafter, plain_greedy

MODEL_ID = "tiny"
TREE = [[0], [1], [0, 0], [1, 0], [0, 0, 0]]


@pytest.fixture(scope="module")
def served(tiny_llama, tiny_tokenizer):
    engine = BatchEngine(tiny_llama, perturbed_drafter(tiny_llama, "amphista", seed=2), TREE, max_len=128, max_batch=4)
    server = Server(engine, tiny_tokenizer, MODEL_ID, ServeConfig(max_tokens_default=16), drafter_kind="amphista")
    yield server, TestClient(create_app(server))
    server.scheduler.stop()


@pytest.fixture(scope="module")
def client(served):
    return served[1]


def _sse(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_health_and_models(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["speculative"] is True
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == MODEL_ID and m["data"][0]["object"] == "model"


def test_completion_schema_and_lossless_text(client, tiny_llama, tiny_tokenizer):
    prompt = "The quick brown fox"
    r = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    ids = tiny_tokenizer(prompt)["input_ids"]
    ref = plain_greedy(tiny_llama, ids, 12)
    eos = tiny_tokenizer.eos_token_id
    ref = ref[: ref.index(eos) + 1] if eos in ref else ref
    assert choice["text"] == tiny_tokenizer.decode(ref, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(ref), "total_tokens": len(ids) + len(ref)}
    spec = body["speculative"]
    assert spec["mode"] == "speculative" and spec["steps"] == len(spec["accept_lengths"]) >= 1
    assert spec["mean_accepted"] >= 1.0
    assert choice["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_text_equals_non_streamed(client, endpoint):
    req = {"model": MODEL_ID, "max_tokens": 20, "temperature": 0}
    if endpoint.endswith("chat/completions"):
        req["messages"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Numbers: 0 1 2"}]
    else:
        req["prompt"] = "Speculative decoding drafts"
    full = client.post(endpoint, json=req).json()
    r = client.post(endpoint, json={**req, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r.text)
    if endpoint.endswith("chat/completions"):
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert full["choices"][0]["message"]["role"] == "assistant"
        expected = full["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        expected = full["choices"][0]["text"]
    assert text == expected and len(expected) > 0
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert "usage" not in chunks[-1]  # OpenAI: usage in a stream only when asked for
    r = client.post(endpoint, json={**req, "stream": True, "stream_options": {"include_usage": True}})
    chunks = _sse(r.text)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert "mean_accepted" in chunks[-1]["speculative"]


def test_stop_strings(client):
    req = {"model": MODEL_ID, "prompt": "Numbers: 0 1", "max_tokens": 20, "temperature": 0}
    text = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert len(text) > 4
    stop = text[2:4]
    cut = text[: text.find(stop)]
    r = client.post("/v1/completions", json={**req, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == cut and r["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["text"] for c in _sse(client.post("/v1/completions", json={**req, "stop": stop, "stream": True}).text) if c["choices"])
    assert streamed == cut


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "hi"}, 400, "model"),
    ({"model": MODEL_ID}, 400, "prompt"),
    ({"model": MODEL_ID, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL_ID, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL_ID, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL_ID, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL_ID, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL_ID, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
])
def test_bad_completion_requests_are_4xx(client, body, status, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error" and "code" in err
    # streaming requests fail the same way, before any event is sent
    r = client.post("/v1/completions", json={**body, "stream": True} if "stream" not in body else body)
    assert r.status_code == status


def test_bad_chat_requests_and_json(client):
    for body, param in [({"model": MODEL_ID}, "messages"), ({"model": MODEL_ID, "messages": []}, "messages"),
                        ({"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
                        ({"model": MODEL_ID, "messages": [{"role": "user", "content": 3}]}, "messages[0].content")]:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert client.get("/v1/nothing").status_code == 404


def test_concurrent_requests_all_answered_correctly(client):
    prompts = ["The quick brown", "A language model", "Pruning removes", "Experts are trained"]
    req = lambda p: {"model": MODEL_ID, "prompt": p, "max_tokens": 10, "temperature": 0}  # noqa: E731
    expected = {p: client.post("/v1/completions", json=req(p)).json()["choices"][0]["text"] for p in prompts}
    got: dict[str, str] = {}

    def worker(p):
        got[p] = client.post("/v1/completions", json=req(p)).json()["choices"][0]["text"]

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_sampling_with_seed_is_reproducible(client):
    req = {"model": MODEL_ID, "prompt": "The quick", "max_tokens": 10, "temperature": 0.8, "seed": 3}
    a = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert a == b


def test_plain_mode(tiny_llama, tiny_tokenizer):
    server = Server(BatchEngine(tiny_llama, max_len=64, max_batch=2), tiny_tokenizer, MODEL_ID, ServeConfig())
    request = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    with TestClient(create_app(server)) as c:  # the app's shutdown stops the decoding thread
        body = c.post("/v1/chat/completions", json=request).json()
    assert not server.scheduler.thread.is_alive()
    assert body["speculative"]["mode"] == "plain" and body["speculative"]["mean_accepted"] == 1.0
    assert body["object"] == "chat.completion"


# ---------------------------------------------------------------------- bad input, OpenAI extras


def test_inputs_that_used_to_crash_are_handled(client):
    base = {"model": MODEL_ID, "prompt": "The quick", "max_tokens": 8}
    tiny_t = client.post("/v1/completions", json={**base, "temperature": 1e-300})
    greedy = client.post("/v1/completions", json={**base, "temperature": 0})
    assert tiny_t.status_code == 200 and tiny_t.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**base, "seed": 2**64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    r = client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].text"
    r = client.post("/v1/completions", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/completions", json={**base, "logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    assert client.get("/health").status_code == 200  # and the server goes on serving


def test_n_choices_and_prompt_lists(client, tiny_llama, tiny_tokenizer):
    prompts = ["The quick brown", "A language model"]
    r = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        ref = plain_greedy(tiny_llama, tiny_tokenizer(p)["input_ids"], 6)
        eos = tiny_tokenizer.eos_token_id
        ref = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert [body["choices"][2 * i + j]["text"] for j in (0, 1)] == [tiny_tokenizer.decode(ref, skip_special_tokens=True)] * 2
    ids = [len(tiny_tokenizer(p)["input_ids"]) for p in prompts]
    assert body["usage"]["prompt_tokens"] == sum(ids)
    sampled = client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 5}).json()
    assert len(sampled["choices"]) == 3 and sampled["usage"]["completion_tokens"] >= 3
    streamed = _sse(client.post("/v1/completions", json={"model": MODEL_ID, "prompt": prompts, "max_tokens": 6,
                                                         "temperature": 0, "stream": True}).text)
    for i in (0, 1):
        text = "".join(c["choices"][0]["text"] for c in streamed if c["choices"] and c["choices"][0]["index"] == i)
        assert text == body["choices"][2 * i]["text"]


def test_model_card_metrics_and_limits(served, tiny_llama, tiny_tokenizer):
    _, client = served
    assert client.get(f"/v1/models/{MODEL_ID}").json()["id"] == MODEL_ID
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    text = client.get("/metrics").text
    for name in ("plmtool_queue_length", "plmtool_tokens_per_second", "plmtool_mean_accepted_tokens",
                 "plmtool_engine_steps_total", "plmtool_http_requests_total"):
        assert name in text
    engine = BatchEngine(tiny_llama, max_len=64, max_batch=2)
    server = Server(engine, tiny_tokenizer, MODEL_ID, ServeConfig(api_key="sesame", max_body_mb=0.001))
    try:
        c = TestClient(create_app(server))
        req = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2}
        r = c.post("/v1/completions", json=req)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401 and c.get("/health").status_code == 200
        auth = {"Authorization": "Bearer sesame"}
        assert c.post("/v1/completions", json=req, headers=auth).status_code == 200
        r = c.post("/v1/completions", json={**req, "prompt": "x" * 2000}, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    finally:
        server.scheduler.stop()


@pytest.fixture(scope="module")
def live_url(served):
    """The app served by uvicorn on 127.0.0.1 in a thread (real sockets: disconnects, clients)."""
    import socket
    import time

    import uvicorn

    server, _ = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_row(served, live_url, stream, monkeypatch, tiny_llama, tiny_tokenizer):
    import time

    import httpx

    server, _ = served
    # a prompt whose answer runs to max_tokens (no end-of-text), decoded slowly enough that the
    # client surely leaves first
    eos = tiny_tokenizer.eos_token_id
    prompt = next(p for p in ("The quick brown", "Numbers: 0 1", "A language model", "Pruning removes")
                  if eos not in plain_greedy(tiny_llama, tiny_tokenizer(p)["input_ids"], 60))
    step = server.engine.step
    monkeypatch.setattr(server.engine, "step", lambda: (time.sleep(0.05), step())[1])
    before = server.scheduler.counters.cancelled
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 60, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=live_url) as c:
        if stream:
            with c.stream("POST", "/v1/completions", json=body) as r:
                next(r.iter_lines())  # the first event, then the client hangs up
        else:
            with pytest.raises(httpx.TimeoutException):
                c.post("/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 30
    while server.scheduler.counters.cancelled == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.scheduler.counters.cancelled == before + 1 and server.scheduler.running == 0


def test_the_official_openai_client_works_unchanged(live_url):
    """The `openai` package against the app served by uvicorn on 127.0.0.1."""
    import openai

    oai = openai.OpenAI(base_url=f"{live_url}/v1", api_key="unused")
    assert oai.models.retrieve(MODEL_ID).id == MODEL_ID
    chat = oai.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Numbers: 0 1 2"}],
                                       max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    parts = list(oai.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Numbers: 0 1 2"}],
                                             max_tokens=10, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == chat.choices[0].message.content and parts[-1].usage.completion_tokens == chat.usage.completion_tokens
    done = oai.completions.create(model=MODEL_ID, prompt=["The quick", "A model"], max_tokens=5, temperature=0)
    assert [c.index for c in done.choices] == [0, 1] and done.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL_ID, prompt="hi", max_tokens=5, logprobs=2)


def test_tokenizer_and_template_refusals_are_400(served, tiny_llama, tiny_tokenizer):
    _, client = served
    r = client.post("/v1/completions", content=b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    strict = build_strict_tokenizer(tiny_tokenizer)
    server = Server(BatchEngine(tiny_llama, max_len=64, max_batch=2), strict, MODEL_ID, ServeConfig(max_queue=4))
    try:
        c = TestClient(create_app(server))
        r = c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": [{"role": "system", "content": "x"},
                                                                                {"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "System role" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"model": MODEL_ID, "prompt": ["a", "b"], "n": 3, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # 6 sequences, a queue of 4
        for path in ("/v1/models/a", "/v1/models/b"):
            assert c.get(path).status_code == 404
        assert server.http_status[("/v1/models/{model_id:path}", 404)] == 2  # one series, not one per path
    finally:
        server.scheduler.stop()


def build_strict_tokenizer(tokenizer):
    """The tiny tokenizer with a chat template that refuses system messages (as Llama 2's and
    Gemma's do, through raise_exception)."""
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    return strict


@pytest.mark.parametrize("field,value", [("max_batch", 0), ("step_tokens", 0), ("max_queue", 0), ("port", 70000),
                                         ("request_timeout_s", -1), ("shutdown_timeout_s", -1), ("max_body_mb", 0),
                                         ("acceptance", "greedy")])
def test_serve_options_name_the_bad_key(field, value):
    from plmtool.errors import PlmtoolError

    with pytest.raises(PlmtoolError, match=f"serve.{field}"):
        ServeConfig(**{field: value}).check()


def test_max_batch_defaults_by_device():
    assert ServeConfig().batch_for(torch.device("cuda")) == 16 and ServeConfig().batch_for(torch.device("cpu")) == 4
    assert ServeConfig(max_batch=3).batch_for(torch.device("cuda")) == 3
