"""Experts on a task-labelled multi-task pool: task floors, balanced baseline, shared experts, accuracy per task."""

from __future__ import annotations

import copy
import gzip
import json

import numpy as np
import pytest
import torch

from plmtool.data.commonsense import Example, eval_record
from plmtool.errors import PlmtoolError
from plmtool.eval.zeroshot import doc_scores
from plmtool.experts.lora import BASE, add_adapters, concat_adapters, lora_config
from plmtool.experts.redistribute import balanced_subset, task_floor
from plmtool.experts.task_eval import score_units, summarize, task_requests
from tests.experts.test_experts_model import TASKS, plmtool, write_fixture


def test_balanced_subset_gives_each_task_an_equal_share_capped_by_its_size():
    tasks = np.array(["a"] * 1000 + ["b"] * 50 + ["c"] * 10)
    mask = balanced_subset(tasks, 120, seed=0)
    assert {t: int(mask[tasks == t].sum()) for t in "abc"} == {"a": 60, "b": 50, "c": 10}
    assert not np.array_equal(balanced_subset(tasks, 120, seed=1), mask)  # the seed draws within a task


def test_task_floor_tops_up_the_highest_weight_samples_of_short_tasks():
    tasks = np.array(["a"] * 20 + ["b"] * 6)
    selected = np.zeros(26, bool)
    selected[:5] = True
    weight = np.arange(26, dtype=float)
    out, added = task_floor(selected, tasks, weight, floor=3)
    assert added == {"b": 3} and out[:5].all() and out[23:].all() and int(out.sum()) == 8
    with pytest.raises(PlmtoolError, match="task 'b' has 6 samples in the pool, fewer than experts.task_floor=7"):
        task_floor(selected, tasks, weight, floor=7)


def test_concatenated_adapter_equals_both_adapters_active(tiny_llama):
    model = add_adapters(copy.deepcopy(tiny_llama), ["a", "b"], lora_config(r=4, alpha=8, dropout=0.0))
    model.add_adapter("c", lora_config(r=2, alpha=8, dropout=0.0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():  # LoRA B starts at zero: give every adapter an update
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        model.base_model.set_adapter(["a", "c"])
        both = model(input_ids=ids).logits
        model.set_adapter("a")
        one = model(input_ids=ids).logits
        concat_adapters(model, "ac", ["a", "c"])
        model.set_adapter("ac")
        merged = model(input_ids=ids).logits
    assert not torch.allclose(both, one, atol=1e-4)  # the second adapter matters
    torch.testing.assert_close(merged, both, rtol=1e-5, atol=1e-5)
    assert model.peft_config["ac"].r == 6


def _examples(n_per_task: int = 3) -> list[Example]:
    out = []
    for t, (q, a) in TASKS.items():
        for i in range(n_per_task):
            wrong = a.format(a=i + 7, b=i, c=i + 1)
            out.append(Example(t, f"{t}-{i}", (q.format(a=i, b=i + 3, c=0),) * 2, (a.format(a=i, b=i + 3, c=2 * i + 3), wrong), i % 2))
    return out


def test_units_score_each_document_under_its_adapter(tiny_llama, tiny_tokenizer):
    """score_units against scoring every document directly under the adapter the unit assigns it."""
    model = add_adapters(copy.deepcopy(tiny_llama), ["x", "y"], lora_config(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    exs = _examples()
    items = [task_requests(t, [e for e in exs if e.task == t], 3, tiny_tokenizer, 32) for t in TASKS]
    n = sum(len(i.docs) for i in items)
    plan = {"base": [BASE] * n, "x": ["x"] * n, "mixed": ["x" if i % 2 else "y" for i in range(n)]}
    got = score_units(model, tiny_tokenizer, items, plan, batch_size=4)

    def direct(adapter):
        if adapter == BASE:
            with model.disable_adapter():
                return [d for task in doc_scores(model, tiny_tokenizer, items, batch_size=3) for d in task]
        model.set_adapter(adapter)
        return [d for task in doc_scores(model, tiny_tokenizer, items, batch_size=3) for d in task]

    ref = {a: direct(a) for a in (BASE, "x", "y")}
    flat = {u: [d for task in got[u] for d in task] for u in got}
    for u, adapters in plan.items():
        for i, a in enumerate(adapters):
            for (ll, _), (rl, _) in zip(flat[u][i], ref[a][i]):
                assert ll == pytest.approx(rl, rel=1e-4, abs=1e-4), (u, i)
    s = summarize(items, got["x"])
    assert set(s["tasks"]) == set(TASKS) and s["macro"] == pytest.approx(np.mean(list(s["tasks"].values())))
    assert s["worst"] == min(s["tasks"].values())
    # the prompt is the chat the experts train on: the user turn, then the assistant's reply
    ctx, cont = items[0].docs[0].requests[0]
    assert ctx.endswith("<|im_start|>assistant\n") and not cont.startswith(" ")


def _eval_file(path, exs):
    with gzip.open(path, "wt") as fh:
        for e in exs:
            fh.write(json.dumps(eval_record(e)) + "\n")
    return path


def test_commands_on_a_task_labelled_pool(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("PLMTOOL_CACHE", str(tmp_path / "cache"))
    data = write_fixture(tmp_path / "tasks.jsonl", 12)
    ev = _eval_file(tmp_path / "eval.jsonl.gz", _examples(4))
    common = [f"model.name_or_path={tiny_llama_dir}", "model.device=cpu", "model.dtype=float32"]
    d, e = tmp_path / "D", tmp_path / "E"
    assert plmtool("experts", "redistribute", "experiment=smoke", *common, f"experts.data={data}", "experts.limit=null",
                   "experts.heldout=0.2", "experts.budget=0.2", "experts.floor=1", "experts.task_floor=3",
                   "experts.replicates=2", f"hydra.run.dir={d}") in (0, None)
    rep = json.loads((d / "report.json").read_text())
    assert set(rep["tasks"]) == set(TASKS)
    for t, v in rep["tasks"].items():
        assert v["size_before"] == 12 - round(12 * 0.2) and v["size_after"] >= 3 and v["size_random_balanced"] >= 1, t
    assert rep["selected"] == sum(v["size_after"] for v in rep["tasks"].values())
    assert (d / "random_balanced.jsonl").is_file() and (d / "replicates" / "1" / "selected.jsonl").is_file()

    tr = [*common, f"experts.redistribution={d}", "trainer.batch_size=4", "experts.eval_batch_size=8",
          f"experts.eval_data={ev}", "experts.shared_experts=true", "experts.shared_r=2", "experts.expert_data=both"]
    # an evaluation task the pool does not hold: one line, before any training
    assert plmtool("experts", "train", "experiment=smoke", *tr, "experts.eval_tasks=[math,chess]",
                   f"hydra.run.dir={tmp_path / 'bad'}") == 2
    assert not (d / "adapters").exists()
    assert plmtool("experts", "train", "experiment=smoke", *tr, f"hydra.run.dir={e}") in (0, None)
    rep = json.loads((e / "report.json").read_text())
    for unit in ("base", "full", "random", "random_balanced", "redistributed", "routed", "routed_cluster", "routed_shared",
                 "oracle", "oracle_cluster"):
        assert set(rep["eval"][unit]["tasks"]) == set(TASKS), unit
        assert all(0.0 <= a <= 1.0 for a in rep["eval"][unit]["tasks"].values()), unit
        assert rep["eval"][unit]["macro"] == pytest.approx(np.mean(list(rep["eval"][unit]["tasks"].values())))
    for unit in ("random", "redistributed", "routed", "routed_shared"):  # two replicates: mean and spread
        reps = rep["eval"][unit]["replicates"]
        assert set(reps) == {unit, f"{unit}_r1"}
        assert rep["eval"][unit]["macro"] == pytest.approx(np.mean([r["macro"] for r in reps.values()]))
    assert "full" not in rep["eval"]["full"].get("replicates", {})
    assert rep["unit_samples"]["shared_0"] == rep["unit_samples"]["expert_0"]
    assert (e / "task_accuracy.json").is_file() and "accuracy per task" in (e / "report.md").read_text()


def test_pool_without_tasks_is_refused_for_task_evaluation(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("PLMTOOL_CACHE", str(tmp_path / "cache"))
    rows = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(30)]
    data = tmp_path / "plain.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = [f"model.name_or_path={tiny_llama_dir}", "model.device=cpu", "model.dtype=float32"]
    d = tmp_path / "D"
    assert plmtool("experts", "redistribute", "experiment=smoke", *common, f"experts.data={data}", "experts.limit=null",
                   "experts.k=2", "experts.floor=1", f"hydra.run.dir={d}") in (0, None)
    ev = _eval_file(tmp_path / "eval.jsonl.gz", _examples(2))
    assert plmtool("experts", "train", "experiment=smoke", *common, f"experts.redistribution={d}", f"experts.eval_data={ev}",
                   f"hydra.run.dir={tmp_path / 'E'}") == 2
    assert not (d / "adapters").exists()


def test_task_below_its_floor_stops_before_the_model(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setenv("PLMTOOL_CACHE", str(tmp_path / "cache"))
    data = write_fixture(tmp_path / "tasks.jsonl", 4)
    rc = plmtool("experts", "redistribute", "experiment=smoke", f"model.name_or_path={tiny_llama_dir}", "model.device=cpu",
                 f"experts.data={data}", "experts.limit=null", "experts.task_floor=8", f"hydra.run.dir={tmp_path / 'D'}")
    assert rc == 2
    assert "fewer than experts.task_floor=8" in capsys.readouterr().err
    assert not (tmp_path / "D" / "embeddings.npy").exists()


def test_stratified_limit_keeps_each_task_share_and_its_floor():
    from plmtool.experts.run_redistribute import stratified_limit

    pool = [{"id": f"{t}{i}", "task": t} for t, n in (("big", 900), ("mid", 90), ("tiny", 10)) for i in range(n)]
    got = stratified_limit(pool, 100, floor=5, seed=0)
    counts = {t: sum(s["task"] == t for s in got) for t in ("big", "mid", "tiny")}
    # 5 each first, the other 85 in proportion to size: 85 * (900, 90, 10) / 1000 = 76.5, 7.65, 0.85,
    # rounded down, the 2 left to the largest remainders (tiny .85, mid .65)
    assert counts == {"big": 5 + 76, "mid": 5 + 8, "tiny": 5 + 1}
    assert sum(counts.values()) == 100
    assert [s["id"] for s in got] == [s["id"] for s in pool if s in got]  # pool order kept
    assert stratified_limit(pool, 100, floor=5, seed=0) == got and stratified_limit(pool, 100, floor=5, seed=1) != got
