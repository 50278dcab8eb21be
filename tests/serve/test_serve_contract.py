"""The serving contract on a real `plmtool draft serve` process (scripts/serve_contract.py): 48
concurrent greedy requests, half streaming, each equal to the prompt sent alone, /health under 1 s
throughout, fewer engine steps for 4 requests batched than one after the other, and a SIGTERM
that exits within 10 s with run.json `finished`."""

from __future__ import annotations

from tests.conftest import load_script


def test_the_serving_contract(tmp_path):
    contract = load_script("serve_contract")
    model, drafter = contract.tiny_checkpoints(tmp_path)
    out = contract.run_contract(model, drafter, tmp_path / "serve", requests=48, max_tokens=24)
    failed = [name for name, ok in out["checks"].items() if not ok]
    assert not failed, (failed, {k: v for k, v in out.items() if k != "checks"})
