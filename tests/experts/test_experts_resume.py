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
from plmtool.experts import lora, run_train
from plmtool.experts.lora import add_adapters, lora_config, train_adapter
from plmtool.experts.tokenize import encode
from tests.conftest import one_thread

HP = dict(lr=1e-2, epochs=3, batch_size=4, warmup_ratio=0.2, seed=3)  # 23 samples: 18 steps over 3 passes


_one_thread = pytest.fixture(autouse=True)(one_thread)  # the tiny model trains fastest on one thread


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
    from tests.conftest import load_script

    return load_script("bench_experts")


def bench_data(folder: Path) -> Path:
    """What `bench_experts.py prepare` writes: a task-labelled pool and evaluation documents."""
    from plmtool.data.commonsense import Example, eval_record

    topics = ["Compute {i} plus {j}.", "Which state is number {i} of {j}?", "Write a function returning {i} times {j}."]
    replies = ["The sum is {k}.", "Alabama is number {i}, in the southeastern region.", "def f():\n    return {i} * {j}"]
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "pool.jsonl.gz", "wt", encoding="utf-8") as f:
        for n in range(60):
            t, i, j = n % 3, n, n % 7 + 2
            f.write(json.dumps({"id": f"s{n}", "task": f"t{t}", "instruction": topics[t].format(i=i, j=j),
                                "output": replies[t].format(i=i, j=j, k=i + j)}) + "\n")
    with gzip.open(folder / "eval.jsonl.gz", "wt", encoding="utf-8") as f:
        for n in range(9):
            t, i, j = n % 3, n + 100, 3
            right, wrong = replies[t].format(i=i, j=j, k=i + j), replies[t].format(i=i + 1, j=j, k=i)
            f.write(json.dumps(eval_record(Example(f"t{t}", f"e{n}", (topics[t].format(i=i, j=j),) * 2, (right, wrong), n % 2))) + "\n")
    return folder


def test_bench_stops_at_its_time_budget_and_the_next_command_finishes(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    bench = load_bench()
    data = bench_data(tmp_path / "data")
    common = ["run", "--data", str(data), "--model", str(tiny_llama_dir), "--model-cache", str(tmp_path / "cache"),
              "--work", str(tmp_path / "work"), "--k", "2", "--replicates", "2", "--task-floor", "2", "--heldout", "0.2",
              "--max-len", "64", "--max-prompt-len", "24", "--batch-size", "4", "--eval-limit", "2"]
    calls: list[str] = []
    real = lora.train_adapter

    def counting(model, name, *args, **kwargs):
        calls.append(name)
        return real(model, name, *args, **kwargs)

    monkeypatch.setattr(run_train, "train_adapter", counting)
    # no time left after the first unit group: the command stops and says so
    bench.main([*common, "--out", str(tmp_path / "o1"), "--time-budget", "0"])
    assert "UNFINISHED" in capsys.readouterr().out and not (tmp_path / "o1" / "bench_experts.json").exists()
    first = list(calls)
    assert first == ["full"]
    bench.main([*common, "--out", str(tmp_path / "o2"), "--time-budget", "100000", "--eval-reserve", "0"])
    assert "full" not in calls[len(first):]  # the saved adapter is reused
    rep = json.loads((tmp_path / "o2" / "bench_experts.json").read_text())
    assert rep["train"]["full"]["reused"] and set(rep["eval"]["redistributed"]["replicates"]) == {"redistributed", "redistributed_r1"}
    for unit in ("base", "full", "random", "random_balanced", "redistributed", "routed", "routed_cluster", "routed_shared", "oracle"):
        assert set(rep["eval"][unit]["tasks"]) == {"t0", "t1", "t2"}, unit
    assert "| routed_shared |" in capsys.readouterr().out


def test_train_command_killed_mid_unit_resumes_to_the_same_adapter(tmp_path, tiny_llama_dir, monkeypatch):
    """`plmtool experts train` killed inside a unit resumes it from the unit's last checkpoint
    (every trainer.save_every steps) and ends with the adapter an uninterrupted job trains."""
    from safetensors.torch import load_file
    from tests.experts.test_experts_model import plmtool, small_redistribution

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
