"""The serving contract on a real `plmtool draft serve` process (scripts/serve_contract.py): 48
concurrent greedy requests, half streaming, each equal to the prompt sent alone, /health under 1 s
throughout, fewer engine steps for 4 requests batched than one after the other, and a SIGTERM
that exits within 10 s with run.json `finished`."""

from __future__ import annotations

from tests.conftest import load_script


def test_the_serving_contract(tmp_path):
    contract = load_script("serve_contract")
    model, drafter = contract.tiny_checkpoints(tmp_path)
    out = contract.run_contract(model, drafter, tmp_path, requests=48, max_tokens=24)
    failed = [name for name, ok in out["checks"].items() if not ok]
    assert not failed, (failed, {k: v for k, v in out.items() if k != "checks"})


def _stream_then_sigterm(contract, tmp_path, timeout_s: str) -> tuple[list[dict], int, str]:
    """A long streamed request to a served tiny model, SIGTERM after its first event: the events
    the client got, the exit code, run.json's status."""
    import asyncio
    import json
    import signal

    import httpx

    model, drafter = contract.tiny_checkpoints(tmp_path)
    server = contract.start_server(model, drafter, tmp_path, [f"serve.shutdown_timeout_s={timeout_s}"])

    async def main() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as c:
            events = []
            body = {"model": str(model), "prompt": "Numbers: 0 1 2", "max_tokens": 200, "temperature": 0, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[len("data: "):]))
                        if len(events) == 1:
                            server.proc.send_signal(signal.SIGTERM)
            return events

    try:
        events = asyncio.run(main())
        server.proc.wait(30)  # the exit the one SIGTERM started
    finally:
        stopped = server.stop(30)  # the exit code and run.json's status (a kill if still running)
    return events, stopped["returncode"], stopped["run_status"]


def test_sigterm_lets_a_streamed_request_finish(tmp_path):
    """Within serve.shutdown_timeout_s an in-flight stream runs to its end before the server stops."""
    contract = load_script("serve_contract")
    events, code, status = _stream_then_sigterm(contract, tmp_path, "30")
    assert code == 0 and status == "finished"
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "error" not in events[-1]


def test_sigterm_past_the_shutdown_timeout_ends_streams_with_an_error(tmp_path):
    """With no time to drain, the stream's last event is the 503 error, and the server still
    records a clean stop."""
    contract = load_script("serve_contract")
    events, code, status = _stream_then_sigterm(contract, tmp_path, "0")
    assert code == 0 and status == "finished"
    assert events[-1].get("error", {}).get("code") == "shutting_down"
