"""scripts/bench_serve.py's pure pieces: statistics, identity comparison, table, targets, server
command, resumed results, and the load generator against a fake server (no model, no GPU)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_serve")


def _ok(tokens: int, steps: int | None = None, text: str = "x") -> dict:
    """A chat completion body; with `steps`, the server's statistics: the first token comes from
    the prefill, the other tokens - 1 from the steps."""
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            "usage": {"completion_tokens": tokens}}
    if steps is not None:
        body["speculative"] = {"steps": steps, "mean_accepted": (tokens - 1) / steps}
    return body


# ------------------------------------------------------------------ statistics


def test_percentile_known_lists(bench):
    xs = list(range(1, 11))  # 1..10
    assert bench.percentile(xs, 50) == pytest.approx(5.5)
    assert bench.percentile(xs, 95) == pytest.approx(9.55)  # numpy.percentile(xs, 95), linear
    assert bench.percentile([3.0], 95) == 3.0
    assert bench.percentile([4.0, 1.0, 3.0], 50) == 3.0  # unsorted input
    assert bench.percentile([], 50) is None


def test_response_record_reads_usage_and_speculative(bench):
    r = bench.response_record(3, 200, 0.5, _ok(13, 4, "hello"))
    assert (r["index"], r["completion_tokens"], r["steps"], r["mean_accepted"], r["text"]) == (3, 13, 4, 3.0, "hello")
    plain = bench.response_record(0, 200, 0.5, _ok(7))  # no speculative object at all
    assert plain["steps"] is None and plain["mean_accepted"] is None and plain["completion_tokens"] == 7
    assert plain["error"] is None
    err = bench.response_record(1, 503, 0.1, {"error": {"message": "queue full"}})
    assert err["completion_tokens"] == 0 and "queue full" in err["error"]


def test_summarize_level(bench):
    records = [
        bench.response_record(0, 200, 1.0, _ok(31, 10)),  # 3 accepted per step
        bench.response_record(1, 200, 2.0, _ok(21, 20)),  # 1 accepted per step
        bench.response_record(2, 200, 3.0, _ok(10)),  # no steps: counts in tokens/s, not in accepted/step
        bench.response_record(3, 500, 0.2, "boom"),
        bench.response_record(4, None, 0.3, None, "ConnectError: refused"),
    ]
    s = bench.summarize_level(records, wall_s=4.0)
    assert s["requests"] == 5 and s["answered"] == 3 and s["errors"] == 2
    assert s["first_error"] == "500: boom"
    assert s["completion_tokens"] == 62 and s["tokens_per_s"] == pytest.approx(15.5)
    assert s["latency_median_s"] == pytest.approx(2.0) and s["latency_p95_s"] == pytest.approx(2.9)
    assert s["accepted_per_step"] == pytest.approx(50 / 30, abs=1e-4)  # pooled over steps, not the mean of 3 and 1
    plain = [bench.response_record(i, 200, 1.0, {**_ok(16), "speculative": {"steps": 15, "mean_accepted": 1.0}})
             for i in range(3)]
    assert bench.summarize_level(plain, 1.0)["accepted_per_step"] == 1.0  # not 16 / 15: the prefill is no step
    no_mean = bench.response_record(0, 200, 1.0, {**_ok(12), "speculative": {"steps": 4}})
    assert bench.summarize_level([no_mean], 1.0)["accepted_per_step"] == 3.0
    empty = bench.summarize_level([bench.response_record(0, 404, 0.1, "no")], wall_s=1.0)
    assert empty["tokens_per_s"] == 0 and empty["latency_median_s"] is None and empty["accepted_per_step"] is None


def test_compare_identity(bench):
    together = [bench.response_record(i, 200, 1.0, _ok(3, text=t)) for i, t in enumerate(["a", "b", "c", "d"])]
    alone = [bench.response_record(i, 200, 1.0, _ok(3, text=t)) for i, t in enumerate(["a", "B", "c"])]
    together[2] = bench.response_record(2, 500, 1.0, "err")
    res = bench.compare_identity(together, alone)
    assert res["requests"] == 4 and res["identical"] == 1
    assert res["differ"] == [1] and res["failed"] == [2, 3]  # 3 has no alone answer
    assert res["examples"][0]["index"] == 1 and res["examples"][0]["first_difference_at_char"] == 0


# ------------------------------------------------------------------ table and targets


def _results(spec1, spec16, plain1, plain16, identical=64, failed=()):
    def lv(tps, acc):
        return {"tokens_per_s": tps, "latency_median_s": 1.234, "latency_p95_s": 2.5, "accepted_per_step": acc, "errors": 0}

    return {
        "modes": {"speculative": {"levels": {"1": lv(spec1, 2.5), "16": lv(spec16, 2.4)}},
                  "plain": {"levels": {"1": lv(plain1, 1.0), "16": lv(plain16, 1.0)}}},
        "identity": {"requests": 64, "identical": identical, "differ": list(range(64 - identical - len(failed))),
                     "failed": list(failed)},
    }


def test_targets_pass(bench):
    t = bench.check_targets(_results(spec1=300, spec16=2700, plain1=150, plain16=2000))
    assert [x["pass"] for x in t] == [True, True, True, True]
    assert t[0]["measured"] == "64 of 64"
    assert [x["measured"] for x in t[1:]] == [9.0, 2.0, 1.35]


def test_targets_fail_and_unmeasured(bench):
    t = bench.check_targets(_results(spec1=300, spec16=2000, plain1=250, plain16=2100, identical=62, failed=[5]))
    assert [x["pass"] for x in t] == [False, False, False, False]
    assert t[0]["measured"] == "62 of 64"
    assert bench.check_targets(_results(300, 2700, 150, 2000, identical=63, failed=[7]))[0]["pass"] is False
    nothing = bench.check_targets({"modes": {"speculative": {"levels": {}}}})
    assert [x["pass"] for x in nothing] == [None] * 4
    assert "not measured" in bench.render_targets(nothing)


def test_render_table_and_targets(bench):
    res = _results(spec1=300, spec16=2700, plain1=150, plain16=2000)
    res["modes"]["plain"]["levels"]["16"]["accepted_per_step"] = None
    table = bench.render_table(res).splitlines()
    assert table[0].startswith("| mode | concurrency | tokens/s | × single-request |")
    assert table[2] == "| speculative | 1 | 300.0 | 1.00 | 1.23 | 2.50 | 2.50 | 0 |"
    assert table[3] == "| speculative | 16 | 2700.0 | 9.00 | 1.23 | 2.50 | 2.40 | 0 |"
    assert table[5] == "| plain | 16 | 2000.0 | 13.33 | 1.23 | 2.50 | - | 0 |"
    lines = bench.render_targets(bench.check_targets(res)).splitlines()
    assert lines[0].startswith("(1) 64 concurrent fp32 greedy") and lines[0].endswith("64 of 64 — PASS")
    assert lines[1].endswith("9.00x — PASS") and lines[3].endswith("1.35x — PASS")
    report = bench.render_report({**res, "complete": False})
    assert "INCOMPLETE" in report


# ------------------------------------------------------------------ server command, saved results


def _args(**kw):
    base = dict(model="/tmp/m.gguf", max_len=2048, max_batch=16, max_queue=512, tree="auto:64", server_arg=[])
    return SimpleNamespace(**{**base, **kw})


def test_server_command(bench, tmp_path):
    cmd = bench.server_command(_args(server_arg=["engine.compile=true"]), tmp_path / "s", 9001, "bfloat16", "/d")
    assert cmd[1:5] == ["-m", "plmtool", "draft", "serve"]
    for o in ("model.name_or_path=/tmp/m.gguf", "model.dtype=bfloat16", "serve.port=9001", "serve.max_batch=16",
              "serve.max_queue=512", f"hydra.run.dir={tmp_path / 's'}", "draft.checkpoint=/d", "draft.tree=auto:64"):
        assert o in cmd
    assert cmd[-1] == "engine.compile=true"  # last: wins over ours
    plain = bench.server_command(_args(max_batch=0), tmp_path / "p", 9002, "float32", None)
    assert not any(x.startswith(("draft.", "serve.max_batch", "serve.max_queue")) for x in plain)


def test_results_resume_only_with_the_same_settings(bench, tmp_path):
    path = tmp_path / "r.json"
    fresh = bench.load_results(path, {"max_tokens": 256}, fresh=False)
    assert set(fresh["modes"]) == {"speculative", "plain"}
    fresh["modes"]["plain"]["levels"]["1"] = {"tokens_per_s": 1.0}
    path.write_text(json.dumps(fresh))
    assert bench.load_results(path, {"max_tokens": 256}, fresh=False)["modes"]["plain"]["levels"] == {"1": {"tokens_per_s": 1.0}}
    with pytest.raises(SystemExit, match="max_tokens"):
        bench.load_results(path, {"max_tokens": 128}, fresh=False)
    assert bench.load_results(path, {"max_tokens": 128}, fresh=True)["modes"]["plain"]["levels"] == {}


# ------------------------------------------------------------------ the load generator against a fake server


class FakeServer:
    """Answers chat completions after a short sleep; counts requests and how many overlap."""

    def __init__(self, delay_s: float = 0.02, fail_every: int = 0):
        self.delay_s, self.fail_every = delay_s, fail_every
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.path == "/v1/chat/completions"
        body = json.loads(request.content)
        self.bodies.append(body)
        n = len(self.bodies)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        if self.fail_every and n % self.fail_every == 0:
            return httpx.Response(503, json={"error": {"message": "queue full"}})
        return httpx.Response(200, json=_ok(9, 4, text=body["messages"][0]["content"].upper()))


def _load(bench, server: FakeServer, concurrency: int, requests: int, questions=("q0", "q1", "q2")):
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(server), base_url="http://fake") as client:
            return await bench.run_load(client, "tiny", list(questions), concurrency, requests, 32)

    return asyncio.run(go())


@pytest.mark.parametrize("concurrency,requests", [(1, 5), (4, 16), (16, 32), (8, 3)])
def test_load_runs_clients_concurrently(bench, concurrency, requests):
    server = FakeServer()
    records, wall, max_in_flight = _load(bench, server, concurrency, requests)
    assert len(server.bodies) == requests and len(records) == requests
    assert server.max_in_flight == max_in_flight == min(concurrency, requests)
    assert [r["index"] for r in records] == list(range(requests))
    # questions in order, cycling; every request greedy with the asked length and model
    assert [r["text"] for r in records] == [f"Q{i % 3}" for i in range(requests)]
    assert all(b == {"model": "tiny", "messages": [{"role": "user", "content": b["messages"][0]["content"]}],
                     "max_tokens": 32, "temperature": 0} for b in server.bodies)
    # c clients over N requests of fixed delay take about ceil(N / c) delays, not N
    assert wall < (requests // concurrency + 1) * server.delay_s + 0.5
    s = bench.summarize_level(records, wall)
    assert s["errors"] == 0 and s["completion_tokens"] == 9 * requests and s["accepted_per_step"] == 2.0


def test_load_counts_errors(bench):
    records, wall, _ = _load(bench, FakeServer(fail_every=3), concurrency=2, requests=9)
    s = bench.summarize_level(records, wall)
    assert s["requests"] == 9 and s["errors"] == 3 and s["first_error"].startswith("503: ")
    assert "queue full" in s["first_error"]


def test_measure_level_warms_up_then_measures(bench):
    server = FakeServer()
    args = SimpleNamespace(warmup=2, max_batch=16, warmup_tokens=4, requests_per_level=0, max_tokens=32)

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(server), base_url="http://fake") as client:
            return await bench.measure_level(client, "tiny", ["a", "b"], 4, args)

    level = asyncio.run(go())
    warm, measured = server.bodies[:4], server.bodies[4:]
    assert level["warmup_requests"] == 4 and all(b["max_tokens"] == 4 for b in warm)  # min(c, max_batch) at once
    assert len(measured) == 16 == level["requests"] and all(b["max_tokens"] == 32 for b in measured)  # max(16, 2c)
    assert level["max_in_flight"] == 4 and "text" not in level["records"][0]


def test_scrape_metrics(bench):
    def handler(request):
        if request.url.path == "/metrics":
            return httpx.Response(200, text="# HELP x y\n# TYPE x counter\nx_total 3\n\nqueue_depth 0\n")
        return httpx.Response(404)

    async def go(h):
        async with httpx.AsyncClient(transport=httpx.MockTransport(h), base_url="http://fake") as client:
            return await bench.scrape_metrics(client)

    assert asyncio.run(go(handler)) == {"status": 200, "lines": ["x_total 3", "queue_depth 0"]}
    assert asyncio.run(go(lambda r: httpx.Response(404)))["lines"] is None


def test_mtbench_site_only_where_the_package_is_missing(bench, tmp_path, monkeypatch):
    import importlib.util

    from plmtool.data.chat import load_mtbench
    from plmtool.data.embedded import FILES

    questions = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}]
    package, relative, _ = FILES["mtbench"]
    real = importlib.util.find_spec
    if real(package) is not None:
        assert bench.mtbench_site(tmp_path, questions) is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    site = bench.mtbench_site(tmp_path, questions)
    assert load_mtbench(str(site / package / relative)) == questions
    env = bench.server_env(site)
    assert env["PYTHONPATH"].split(":")[:2] == [str(site), str(bench.ROOT)]
