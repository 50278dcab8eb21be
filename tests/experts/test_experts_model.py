"""Experts on a tiny random Llama: tokenization, losses, LoRA experts and routing, end-to-end commands."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from plmtool import cli
from plmtool.errors import PlmtoolError
from plmtool.experts.embed import ModelEmbedder, embed_cached
from plmtool.experts.losses import encoded_losses
from plmtool.experts.lora import BASE, add_adapters, lora_config, train_adapter
from plmtool.experts.need import need_signal
from plmtool.experts.samples import load_samples
from plmtool.experts.tokenize import IGNORE, encode

TASKS = {
    "math": ("Compute {a} plus {b}.", "The sum is {c}."),
    "geo": ("Which state is number {a} in the list of {b} states?", "Alabama is a state in the southeastern region, number {a}."),
    "code": ("Write a function that returns {a} times {b}.", "def f():\n    return {a} * {b}"),
}


def write_fixture(path, n_per_task=24, bad_line=None):
    rows = []
    for t, (q, a) in TASKS.items():
        for i in range(n_per_task):
            rows.append({"instruction": q.format(a=i, b=i + 3, c=2 * i + 3), "input": "", "output": a.format(a=i, b=i + 3, c=2 * i + 3), "task": t})
    lines = [json.dumps(r) for r in rows]
    if bad_line is not None:
        lines.insert(bad_line, json.dumps({"instruction": "no output here"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_labels_cover_exactly_the_assistant_reply(tiny_tokenizer):
    msgs = [{"role": "user", "content": "Compute 2 plus 3."}, {"role": "assistant", "content": "The sum is 5."}]
    enc = encode(tiny_tokenizer, msgs, max_len=128)
    labelled = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE]
    assert tiny_tokenizer.decode(labelled) == "The sum is 5.<|im_end|>"  # the reply and its end-of-turn marker
    assert all(lab in (IGNORE, t) for t, lab in zip(enc["input_ids"], enc["labels"]))
    short = encode(tiny_tokenizer, msgs, max_len=6)
    assert len(short["input_ids"]) == 6


def test_sample_loss_matches_model_loss(tiny_llama, tiny_tokenizer):
    msgs = [{"role": "user", "content": "Compute 2 plus 3."}, {"role": "assistant", "content": "The sum is 5."}]
    enc = encode(tiny_tokenizer, msgs, max_len=128)
    nll, ntok = encoded_losses(tiny_llama, [enc, enc], tiny_tokenizer.pad_token_id, batch_size=2)
    ids = torch.tensor([enc["input_ids"]])
    ref = tiny_llama(input_ids=ids, labels=torch.tensor([enc["labels"]])).loss.item()  # HF's own shifted CE
    assert nll[0] / ntok[0] == pytest.approx(ref, rel=1e-5)
    assert nll[1] == pytest.approx(nll[0], rel=1e-6)
    need = need_signal(tiny_llama, tiny_tokenizer, [{"messages": msgs}], "loss", 128, None)
    assert need[0] == pytest.approx(ref, rel=1e-5)
    ifd = need_signal(tiny_llama, tiny_tokenizer, [{"messages": msgs}], "ifd", 128, None)
    assert 0 < ifd[0] <= 1.5


def test_training_loss_matches_hf_loss(tiny_llama, tiny_tokenizer):
    import copy

    from plmtool.experts.lora import assistant_loss, labelled_positions
    from plmtool.experts.tokenize import collate

    model = add_adapters(copy.deepcopy(tiny_llama), ["a"], lora_config(r=4, alpha=8, dropout=0.0))
    msgs = [[{"role": "user", "content": f"Compute {i} plus 1."}, {"role": "assistant", "content": "The sum is" + " one" * i}] for i in range(3)]
    b = collate([encode(tiny_tokenizer, m, 64) for m in msgs], tiny_tokenizer.pad_token_id)
    ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    got = assistant_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    # the training loop's path: labelled positions found on the host, passed with the batch
    pos, target = labelled_positions(b["labels"])
    assert pos.numel() == int((b["labels"][:, 1:] != -100).sum())
    via_positions = assistant_loss(model, b["input_ids"], b["attention_mask"], positions=(pos, target))
    assert via_positions.item() == pytest.approx(ref.item(), rel=1e-5)


def test_model_embedder_is_mean_pooled_hidden_state(tiny_llama, tiny_tokenizer, tmp_path):
    texts = ["Compute 2 plus 3.", "Which state is number one?", "Write a function"]
    emb = ModelEmbedder(tiny_llama, tiny_tokenizer, "tiny", max_len=32, batch_size=2)
    got = emb.embed(texts)
    for i, t in enumerate(texts):
        ids = torch.tensor([tiny_tokenizer(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            h = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        assert np.allclose(got[i], h.mean(0).numpy(), atol=1e-5)
    a, info = embed_cached(emb, texts, tmp_path)
    b, info2 = embed_cached(emb, texts, tmp_path)
    assert not info["cached"] and info2["cached"] and np.array_equal(a, b)


def test_missing_field_names_file_and_line(tmp_path):
    path = write_fixture(tmp_path / "data.jsonl", n_per_task=2, bad_line=3)
    with pytest.raises(PlmtoolError, match=r"data.jsonl:4: missing field 'output'"):
        load_samples(str(path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PlmtoolError, match="no usable conversations"):
        load_samples(str(tmp_path / "empty.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(PlmtoolError, match=r"broken.jsonl:2: malformed JSON"):
        load_samples(str(tmp_path / "broken.jsonl"))
    (tmp_path / "twice.jsonl").write_text('{"id": "a", "instruction": "a", "output": "b"}\n{"id": "a", "instruction": "c", "output": "d"}\n')
    with pytest.raises(PlmtoolError, match="sample id 'a' is given to more than one record"):
        load_samples(str(tmp_path / "twice.jsonl"))


def test_expert_adapter_changes_only_its_routed_inputs(tiny_llama, tiny_tokenizer):
    import copy

    model = add_adapters(copy.deepcopy(tiny_llama), ["expert_0", "expert_1"], lora_config(r=4, alpha=8, dropout=0.0))
    msgs = [[{"role": "user", "content": f"Compute {i} plus 1."}, {"role": "assistant", "content": f"The sum is {i + 1}."}] for i in range(6)]
    enc = [encode(tiny_tokenizer, m, 64) for m in msgs]
    routes = ["expert_0", "expert_1", "expert_0", "expert_1", BASE, "expert_1"]
    pad = tiny_tokenizer.pad_token_id
    before, _ = encoded_losses(model, enc, pad, batch_size=6, adapter_names=routes)
    base, _ = encoded_losses(model, enc, pad, batch_size=6, adapter_names=[BASE] * 6)
    assert np.allclose(before, base)  # fresh LoRA (B = 0) is the identity
    stats = train_adapter(model, "expert_0", enc[:2], pad, lr=1e-2, epochs=4, batch_size=2)
    assert stats["steps"] == 4
    after, _ = encoded_losses(model, enc, pad, batch_size=6, adapter_names=routes)
    for i, r in enumerate(routes):
        if r == "expert_0":
            assert not np.isclose(after[i], before[i], rtol=1e-6), i
        else:
            assert after[i] == pytest.approx(before[i], rel=1e-6, abs=1e-6), i


def plmtool(*argv):
    """Run the CLI in-process; returns the exit code."""
    try:
        return cli.main(list(argv))
    except SystemExit as e:
        return e.code


def small_redistribution(tmp_path, model_dir, monkeypatch) -> tuple[Path, list[str]]:
    """`plmtool experts redistribute` on the tiny model over 8 samples per task (half selected, floor
    2): its run dir and the model overrides every later command of the test repeats."""
    monkeypatch.setenv("PLMTOOL_CACHE", str(tmp_path / "cache"))
    common = [f"model.name_or_path={model_dir}", "model.device=cpu", "model.dtype=float32"]
    d = tmp_path / "D"
    assert plmtool("experts", "redistribute", "experiment=smoke", *common, f"experts.data={write_fixture(tmp_path / 't.jsonl', 8)}",
                   "experts.limit=null", "experts.heldout=0.2", "experts.budget=0.5", "experts.floor=2",
                   f"hydra.run.dir={d}") in (0, None)
    return d, common


def test_commands_end_to_end(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("PLMTOOL_CACHE", str(tmp_path / "cache"))
    data = write_fixture(tmp_path / "tasks.jsonl")
    with data.open("a") as f:  # records that cannot train: skipped, and counted in the report
        f.write(json.dumps({"instruction": "Say nothing.", "output": ""}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "Anyone there?"}]}) + "\n")
    d, e = tmp_path / "D", tmp_path / "E"
    common = [f"model.name_or_path={tiny_llama_dir}", "model.device=cpu", "model.dtype=float32"]
    rc = plmtool("experts", "redistribute", "experiment=smoke", *common, f"experts.data={data}", "experts.limit=null",
                 "experts.heldout=0.2", "experts.budget=0.25", "experts.floor=2", "experts.need=ifd", f"hydra.run.dir={d}")
    assert rc in (0, None)
    rep = json.loads((d / "report.json").read_text())
    assert rep["total"] == 57 and rep["heldout"] == 15  # 5 of each task's 24 held out
    assert rep["data"] == {"source": str(data), "conversations": 72, "skipped": {"empty_turn": 1, "no_exchange": 1}}
    assert "skipped 2 records: 1 with an empty turn, 1 without a user turn answered by the assistant" in (d / "report.md").read_text()
    assert rep["selected"] == sum(c["size_after"] for c in rep["clusters"]) >= round(0.25 * 57)
    assert sum(c["size_before"] for c in rep["clusters"]) == 57 and all(c["size_after"] >= 2 for c in rep["clusters"])
    assert set(rep["task_cluster"]) == set(TASKS)
    manifest = [json.loads(line) for line in (d / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 57 and {"id", "cluster", "density", "weight", "selected"} <= set(manifest[0])
    assert sum(m["selected"] for m in manifest) == rep["selected"]
    shards = [len((d / "shards" / f"expert_{c}.jsonl").read_text().splitlines()) for c in range(3)]
    assert shards == [c["size_after"] for c in rep["clusters"]]
    assert (d / "semantic_space.png").stat().st_size > 1000 and (d / "centroids.npy").is_file()

    # one expert as its own job (what a multirun / Slurm array does), then the rest and evaluation
    tr = [*common, f"experts.redistribution={d}", "trainer.batch_size=4", "experts.eval_batch_size=8"]
    assert plmtool("experts", "train", "experiment=smoke", *tr, "experts.expert_index=1", f"hydra.run.dir={tmp_path / 'job1'}") in (0, None)
    job = json.loads((tmp_path / "job1" / "report.json").read_text())
    assert job["job"] == "expert_1" and (d / "adapters" / "expert_1" / "adapter_config.json").is_file()
    assert plmtool("experts", "train", "experiment=smoke", *tr, "experts.top_k=2", f"hydra.run.dir={e}") in (0, None)
    rep = json.loads((e / "report.json").read_text())
    assert rep["train"]["expert_1"]["reused"] and not rep["train"]["expert_0"]["reused"]
    for key in ("base", "full", "random", "redistributed", "routed", "oracle", "routed_top2"):
        assert isinstance(rep["eval"][key]["loss"], float) and rep["eval"][key]["loss"] > 0, key
    assert rep["eval"]["full"]["loss"] < rep["eval"]["base"]["loss"]  # training on the tasks lowers held-out loss
    assert rep["eval"]["oracle"]["loss"] <= rep["eval"]["routed"]["loss"] + 1e-9
    assert set(rep["loss_per_task"]["routed"]) == set(TASKS)
    assert 0 <= rep["router"]["oracle"]["agreement_group"] <= 1
    # assemble the trained adapters and run an lm-eval task with routing per example
    a = tmp_path / "A"
    assert plmtool("experts", "train", "experiment=smoke", *tr, "experts.mode=assemble", "experts.oracle=false",
                   "experts.lm_eval_tasks=[arc_easy,rte]", "experts.lm_eval_limit=6", f"hydra.run.dir={a}") in (0, None)
    rep_a = json.loads((a / "report.json").read_text())
    assert rep_a["eval"]["routed"]["loss"] == pytest.approx(rep["eval"]["routed"]["loss"], rel=1e-6)
    for name in ("base", "full", "routed"):
        assert 0.0 <= rep_a["lm_eval"][name]["arc_easy"] <= 1.0 and 0.0 <= rep_a["lm_eval"][name]["rte"] <= 1.0
    # routed generation for one prompt
    g = tmp_path / "G"
    assert plmtool("experts", "train", *tr, "experts.mode=generate", "experts.prompt=Compute 2 plus 3.", "experts.max_new_tokens=5",
                   f"hydra.run.dir={g}") in (0, None)
    gen = json.loads((g / "report.json").read_text())["generation"]
    assert gen["expert"] in (0, 1, 2) and isinstance(gen["response"], str)
    # the same from Python: same route, same greedy answer
    from plmtool.experts.routed import load_routed

    experts = load_routed(str(d), SimpleNamespace(name_or_path=str(tiny_llama_dir), dtype="float32", device="cpu"))
    py = experts.generate("Compute 2 plus 3.", max_new_tokens=5, max_prompt_len=32)
    assert py["expert"] == gen["expert"] and py["response"] == gen["response"]


def test_bad_input_fails_cleanly_without_half_written_outputs(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setenv("PLMTOOL_CACHE", str(tmp_path / "cache"))
    data = write_fixture(tmp_path / "tasks.jsonl", n_per_task=2)
    common = [f"model.name_or_path={tiny_llama_dir}", "model.device=cpu", f"experts.data={data}", "experts.heldout=0"]
    obj = tmp_path / "one.json"
    obj.write_text(json.dumps({"instruction": "a", "output": "b"}))
    cases = [
        (["experts.k=50"], "larger than the number of training samples"),
        (["experts.budget=0"], "budget must be in (0, 1]"),
        (["experts.budget=1.5"], "budget must be in (0, 1]"),
        ([f"experts.data={write_fixture(tmp_path / 'bad.jsonl', 2, bad_line=2)}"], "bad.jsonl:3: missing field 'output'"),
        ([f"experts.data={obj}"], f"{obj}: line 1 column 1: expected a JSON array of conversations, found an object"),
    ]
    for i, (extra, msg) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert plmtool("experts", "redistribute", *common, *extra, f"hydra.run.dir={out}") == 2
        assert msg in capsys.readouterr().err
        assert not (out / "report.json").exists() and not (out / "manifest.jsonl").exists()
        assert not list(out.rglob("*.tmp"))
    assert plmtool("experts", "train", f"experts.redistribution={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'E'}") == 2
    assert "not a finished redistribution run" in capsys.readouterr().err
    # the trainer settings are checked as drafter training checks them (plmtool.train_config)
    assert plmtool("experts", "train", "trainer.precision=half", f"experts.redistribution={tmp_path / 'nope'}",
                   f"hydra.run.dir={tmp_path / 'E'}") == 2
    assert "trainer.precision must be auto, bf16 or fp32, got 'half'" in capsys.readouterr().err


@pytest.mark.real_model
def test_packaged_minilm_clusters_recover_task_labels():
    from sklearn.metrics import adjusted_rand_score

    from plmtool.experts.cluster import kmeans
    from plmtool.experts.embed import make_embedder

    samples = [(t, q.format(a=i, b=i + 3, c=2 * i + 3)) for t, (q, _) in TASKS.items() for i in range(12)]
    emb = make_embedder("minilm").embed([q for _, q in samples])
    assert emb.shape == (36, 384)
    labels, _ = kmeans(emb, 3, seed=0)
    assert adjusted_rand_score([t for t, _ in samples], labels) > 0.9
