"""Resumable LoRA training (checkpoints, deadlines) and the resumable experts benchmark, on a tiny random Llama."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
import torch

from plmtool import train_loop
from plmtool.errors import PlmtoolError
from plmtool.experts import lora
from plmtool.experts.lora import add_adapters, lora_config, train_adapter
from plmtool.experts.tokenize import encode

HP = dict(lr=1e-2, epochs=3, batch_size=4, warmup_ratio=0.2, seed=3)  # 23 samples: 18 steps over 3 passes


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny model trains in milliseconds per step on one thread; several threads only contend
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoded(tiny_tokenizer):
    msgs = [[{"role": "user", "content": f"Compute {i} plus {i % 7}."}, {"role": "assistant", "content": "The sum is" + " one" * (i % 5)}]
            for i in range(23)]
    return [encode(tiny_tokenizer, m, 64) for m in msgs]


def fresh_model(tiny_llama, r=4, dropout=0.1):
    """A new process's view: the base model with a freshly initialised adapter 'unit'."""
    torch.manual_seed(0)
    return add_adapters(copy.deepcopy(tiny_llama), ["unit"], lora_config(r=r, alpha=2 * r, dropout=dropout))


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def clock_after(monkeypatch, ticks: int, then=float("inf")):
    """Deadline checks (one after each step but the last) see a time before any deadline `ticks`
    times, then `then` (a time, or an exception)."""
    calls = iter(range(10**9))

    def now() -> float:
        if next(calls) < ticks:
            return 0.0
        if isinstance(then, BaseException):
            raise then
        return then

    monkeypatch.setattr(train_loop, "now", now)


def test_training_resumed_in_pieces_equals_uninterrupted(tiny_llama, encoded, tiny_tokenizer, tmp_path, monkeypatch):
    pad = tiny_tokenizer.pad_token_id
    ref_model = fresh_model(tiny_llama)
    ref = train_adapter(ref_model, "unit", encoded, pad, **HP)
    ref_rng = torch.get_rng_state()
    assert ref["steps"] == 18 and ref["finished"]

    # piece 1: the deadline passes after 7 steps
    ckpt = tmp_path / "unit.pt"
    clock_after(monkeypatch, 6)
    part = train_adapter(fresh_model(tiny_llama), "unit", encoded, pad, **HP, checkpoint=ckpt, deadline=1.0)
    assert not part["finished"] and part["steps_done"] == 7 and part["final_loss"] is None and ckpt.is_file()
    # piece 2: killed after step 11, after a periodic checkpoint at step 10
    clock_after(monkeypatch, 3, then=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        train_adapter(fresh_model(tiny_llama), "unit", encoded, pad, **HP, checkpoint=ckpt, checkpoint_every=5, deadline=1.0)
    # piece 3: a new process (other global random state, other adapter initialisation) finishes
    monkeypatch.setattr(train_loop, "now", lambda: 0.0)
    torch.manual_seed(12345)
    model = add_adapters(copy.deepcopy(tiny_llama), ["unit"], lora_config(r=4, alpha=8, dropout=0.1))
    done = train_adapter(model, "unit", encoded, pad, **HP, checkpoint=ckpt, deadline=1.0)

    got, want = lora_weights(model), lora_weights(ref_model)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-7, msg=n)
    assert done["finished"] and done["steps_done"] == 18
    for key in ("steps", "train_tokens", "first_loss", "final_loss"):
        assert done[key] == ref[key], key
    assert [p["steps"] for p in done["pieces"]] == [[0, 7], [7, 10], [10, 18]]
    assert done["seconds"] == pytest.approx(sum(p["seconds"] for p in done["pieces"]), abs=2e-3)
    assert torch.equal(torch.get_rng_state(), ref_rng)  # dropout drew the same numbers

    # a finished checkpoint is loaded, not trained again
    again_model = fresh_model(tiny_llama)
    again = train_adapter(again_model, "unit", encoded, pad, **HP, checkpoint=ckpt)
    assert again["final_loss"] == ref["final_loss"] and again["pieces"] == done["pieces"]
    assert all(torch.equal(v, want[n]) for n, v in lora_weights(again_model).items())


def test_checkpoint_of_other_settings_is_refused(tiny_llama, encoded, tiny_tokenizer, tmp_path, monkeypatch):
    pad = tiny_tokenizer.pad_token_id
    ckpt = tmp_path / "unit.pt"
    clock_after(monkeypatch, 2)
    train_adapter(fresh_model(tiny_llama), "unit", encoded, pad, **HP, checkpoint=ckpt, deadline=1.0)
    before = ckpt.read_bytes()
    cases = [
        (fresh_model(tiny_llama), encoded, {**HP, "lr": 2e-2}, "lr: 0.01 there, 0.02 now"),
        (fresh_model(tiny_llama), encoded, {**HP, "batch_size": 2}, "batch_size"),
        (fresh_model(tiny_llama), encoded[:-1], HP, "data_sha256"),
        (fresh_model(tiny_llama, r=8), encoded, HP, "lora"),
        (fresh_model(tiny_llama, dropout=0.0), encoded, HP, "lora"),
    ]
    for model, data, hp, msg in cases:
        with pytest.raises(PlmtoolError, match="other hyper-parameters or data") as err:
            train_adapter(model, "unit", data, pad, **hp, checkpoint=ckpt)
        assert msg in str(err.value)
    assert ckpt.read_bytes() == before  # a refused checkpoint is left as it was
    with pytest.raises(PlmtoolError, match="needs a checkpoint"):
        train_adapter(fresh_model(tiny_llama), "unit", encoded, pad, **HP, deadline=1.0)


# ----------------------------------------------------------------------------- the benchmark script


def load_bench():
    from conftest import load_script

    return load_script("bench_experts")


def bench_data(path: Path) -> Path:
    topics = ["Compute {i} plus {j}.", "Which state is number {i} of {j}?", "Write a function returning {i} times {j}."]
    replies = ["The sum is {k}.", "Alabama is number {i}, in the southeastern region.", "def f():\n    return {i} * {j}"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for n in range(60):
            t, i, j = n % 3, n, n % 7 + 2
            msgs = [{"role": "user", "content": topics[t].format(i=i, j=j)},
                    {"role": "assistant", "content": replies[t].format(i=i, j=j, k=i + j)}]
            f.write(json.dumps({"id": f"s{n}", "messages": msgs}) + "\n")
    return path


def test_bench_run_killed_then_stopped_by_its_time_budget_resumes_to_the_same_losses(tmp_path, tiny_llama_dir, monkeypatch):
    bench = load_bench()
    data = bench_data(tmp_path / "data.jsonl.gz")
    common = ["run", "--data", str(data), "--model", str(tiny_llama_dir), "--model-cache", str(tmp_path / "cache"),
              "--heldout", "0.2", "--k", "2", "--budget", "0.5", "--max-len", "64", "--epochs", "1", "--batch-size", "4",
              "--eval-batch-size", "16", "--r", "4", "--time-budget", "100000"]
    calls: list[str] = []
    real = lora.train_adapter

    def recording(model, name, *args, **kwargs):
        calls.append(name)
        return real(model, name, *args, **kwargs)

    def killed_at_expert_1(model, name, *args, **kwargs):
        if name == "expert_1":  # the command is killed between two units (no checkpoint of expert_1 yet)
            raise KeyboardInterrupt
        return recording(model, name, *args, **kwargs)

    def stopping_full(model, name, *args, **kwargs):
        if name == "full":  # the budget runs out after 5 of the full-data unit's 12 steps
            clock_after(monkeypatch, 4, then=float("inf"))
        try:
            return recording(model, name, *args, **kwargs)
        finally:
            monkeypatch.setattr(train_loop, "now", lambda: 0.0)

    def command(*extra: str) -> None:
        torch.manual_seed(0)  # each command is a new process: the same global random state at its start
        bench.main([*common, *extra])

    monkeypatch.setattr(lora, "train_adapter", recording)
    command("--work", str(tmp_path / "w_ref"), "--out", str(tmp_path / "o_ref"))
    ref = json.loads((tmp_path / "o_ref" / "bench_experts.json").read_text())
    assert ref["stages_done"][-1] == "done" and ref["units"]["full"]["train"]["steps"] == 12

    monkeypatch.setattr(lora, "train_adapter", killed_at_expert_1)
    with pytest.raises(KeyboardInterrupt):
        command("--work", str(tmp_path / "w"), "--out", str(tmp_path / "o0"))
    monkeypatch.setattr(lora, "train_adapter", stopping_full)
    calls.clear()
    command("--work", str(tmp_path / "w"), "--out", str(tmp_path / "o1"))
    assert calls == ["warmup", "expert_1", "full"]
    first = json.loads((tmp_path / "o1" / "bench_experts.json").read_text())
    progress = first["units"]["full"]["in_progress"]
    assert first["units"]["full"].keys() == {"in_progress"} and (progress["steps_done"], progress["steps"]) == (5, 12)
    assert "done" not in first["stages_done"] and first["commands"][1]["stopped_in"] == "full"
    assert (tmp_path / "w" / "checkpoints" / "full.pt").is_file()

    # other arguments on the same work dir are refused, and leave it as it was
    with pytest.raises(SystemExit, match=r"other arguments or data \(lr: 0.0004 there, 0.001 now\)"):
        command("--lr", "1e-3", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o_bad"))

    monkeypatch.setattr(lora, "train_adapter", recording)
    calls.clear()
    command("--work", str(tmp_path / "w"), "--out", str(tmp_path / "o2"))
    assert calls == ["warmup", "full"]  # finished units are not trained again
    second = json.loads((tmp_path / "o2" / "bench_experts.json").read_text())
    assert second["stages_done"][-1] == "done" and len(second["commands"]) == 3
    assert (tmp_path / "o2" / "manifest.jsonl").is_file() and not (tmp_path / "w" / "checkpoints" / "full.pt").exists()
    assert second["eval"] == ref["eval"] and second.keys() == ref.keys()
    for name, unit in ref["units"].items():
        assert second["units"][name]["heldout_loss"] == unit["heldout_loss"], name
        assert second["units"][name]["per_cluster"] == unit["per_cluster"], name
    full = second["units"]["full"]["train"]
    assert [p["steps"] for p in full["pieces"]] == [[0, 5], [5, 12]]
    assert full["final_loss"] == ref["units"]["full"]["train"]["final_loss"]
    assert second["train_seconds"]["full"] == full["seconds"]


def test_train_command_killed_mid_unit_resumes_to_the_same_adapter(tmp_path, tiny_llama_dir, monkeypatch):
    """`plmtool experts train` killed inside a unit resumes it from the unit's last checkpoint
    (every trainer.save_every steps) and ends with the adapter an uninterrupted job trains."""
    from safetensors.torch import load_file
    from test_experts_model import plmtool, small_redistribution

    d, common = small_redistribution(tmp_path, tiny_llama_dir, monkeypatch)
    job = [*common, f"experts.redistribution={d}", "experts.baseline=random", "trainer.batch_size=2", "trainer.epochs=2",
           "trainer.save_every=1", "trainer.log_every=1"]
    # the uninterrupted job, into its own adapters directory
    assert plmtool("experts", "train", "experiment=smoke", *job, f"experts.adapters_dir={tmp_path / 'whole'}",
                   f"hydra.run.dir={tmp_path / 'E0'}") in (0, None)
    whole = json.loads((tmp_path / "E0" / "report.json").read_text())["train"]["random"]
    assert whole["steps"] >= 6

    calls = iter(range(10**9))
    real_loss = lora.assistant_loss

    def dies_at_step_4(*a, **k):
        if next(calls) == 3:
            raise RuntimeError("killed")
        return real_loss(*a, **k)

    monkeypatch.setattr(lora, "assistant_loss", dies_at_step_4)
    assert plmtool("experts", "train", "experiment=smoke", *job, f"hydra.run.dir={tmp_path / 'E1'}") not in (0, None)
    (ckpt,) = (d / "adapters" / "checkpoints").glob("random-*.pt")
    assert torch.load(ckpt, weights_only=False)["step"] == 3
    assert not (d / "adapters" / "random" / "adapter_config.json").exists()  # no adapter from a killed job

    # a checkpoint of earlier settings of the unit: never loaded, removed with this one
    stale = ckpt.with_name("random-0123456789abcdef.pt")
    stale.write_bytes(b"old")
    monkeypatch.setattr(lora, "assistant_loss", real_loss)
    assert plmtool("experts", "train", "experiment=smoke", *job, f"hydra.run.dir={tmp_path / 'E2'}") in (0, None)
    resumed = json.loads((tmp_path / "E2" / "report.json").read_text())["train"]["random"]
    assert [p["steps"] for p in resumed["pieces"]] == [[0, 3], [3, whole["steps"]]]
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-6)
    assert not ckpt.exists() and not stale.exists()  # removed once the adapter is saved
    a = load_file(d / "adapters" / "random" / "adapter_model.safetensors")
    b = load_file(tmp_path / "whole" / "random" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the unit's adapter does not depend on the job: trained among all units it is the same
    everything = [a for a in job if not a.startswith("experts.baseline")]
    assert plmtool("experts", "train", "experiment=smoke", *everything, f"experts.adapters_dir={tmp_path / 'all'}",
                   f"hydra.run.dir={tmp_path / 'E3'}") in (0, None)
    c = load_file(tmp_path / "all" / "random" / "adapter_model.safetensors")
    assert all(torch.equal(c[k], b[k]) for k in b)
