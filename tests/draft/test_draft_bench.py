"""`plmtool draft bench` / `plmtool draft serve` end to end, in-process, on a tiny model."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from plmtool import cli
from plmtool.draft.config import DrafterConfig, EngineOptions
from plmtool.draft.drafter import build_drafter, save_drafter, target_dims


def _cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["plmtool", *args])
    cli.main(list(args))


@pytest.fixture(scope="module")
def drafters(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("drafters")
    paths = {}
    for kind in ("amphista", "medusa"):
        d = build_drafter(DrafterConfig(kind=kind, num_heads=3), target=tiny_llama)
        paths[kind] = save_drafter(d, root / kind, target_dims(tiny_llama))
    return paths


def test_bench_writes_report_and_spec_bench_answers(monkeypatch, tmp_path, tiny_llama_dir, drafters):
    run = tmp_path / "bench"
    _cli(monkeypatch, "draft", "bench", f"model.name_or_path={tiny_llama_dir}", f"draft.checkpoint={drafters['amphista']}",
         f"draft.medusa_checkpoint={drafters['medusa']}", "bench.num_questions=3", "bench.max_new_tokens=12",
         "bench.runs=2", "bench.methods=[ar,hf_generate,medusa,amphista]", "draft.tree=auto:8", "draft.tree_calibration=2",
         "bench.max_len=512", f"hydra.run.dir={run}")
    report = json.loads((run / "report.json").read_text())
    assert set(report["methods"]) == {"ar", "hf_generate", "medusa", "amphista"}
    for name, m in report["methods"].items():
        assert m["tokens_per_s"] > 0 and m["questions"] == 3
        assert m["mean_accepted"] >= 1.0
        # fp32: every method reproduces plain greedy decoding token for token
        assert m["identical_to_ar"], name
        lines = [json.loads(x) for x in (run / "answers" / f"{name}.jsonl").read_text().splitlines()]
        assert len(lines) == 3
        c = lines[0]["choices"][0]
        assert {"turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"} <= set(c)
    assert report["methods"]["ar"]["mean_accepted"] == 1.0
    # time to the first token: engines report it, below their whole time per question; generate() does not
    for name in ("ar", "medusa", "amphista"):
        m = report["methods"][name]
        assert 0 < m["first_token_ms"] < 1000 * m["wall_time_s"] / m["questions"]
        assert 0 < m["decode_time_s"] < m["wall_time_s"]
    assert report["methods"]["hf_generate"]["first_token_ms"] is None
    assert report["identical_to_ar"] is True
    assert report["speedups"]["amphista"]["ar"] > 0 and "hf_generate" in report["speedups"]["ar"]
    assert report["trees"]["amphista"]["nodes"] == 9
    assert report["engine"] == dataclasses.asdict(EngineOptions())  # the engine options it decoded with
    assert (run / "report.md").read_text().startswith("# plmtool draft bench")


def test_bench_skips_methods_without_checkpoint(monkeypatch, tmp_path, tiny_llama_dir, drafters):
    run = tmp_path / "bench"
    _cli(monkeypatch, "draft", "bench", f"model.name_or_path={tiny_llama_dir}", f"draft.checkpoint={drafters['amphista']}",
         "bench.num_questions=1", "bench.max_new_tokens=4", "bench.runs=1", "bench.methods=[ar,medusa,amphista]",
         "draft.tree=[[0],[1],[0,0]]", f"hydra.run.dir={run}")
    report = json.loads((run / "report.json").read_text())
    assert "medusa" in report["skipped"] and "amphista" in report["methods"]


def test_bench_with_a_dynamic_tree_decodes_as_plain_greedy(monkeypatch, tmp_path, tiny_llama_dir, drafters):
    run = tmp_path / "bench"
    _cli(monkeypatch, "draft", "bench", f"model.name_or_path={tiny_llama_dir}", f"draft.checkpoint={drafters['amphista']}",
         "bench.num_questions=2", "bench.max_new_tokens=12", "bench.runs=1", "bench.methods=[ar,amphista]",
         "draft.tree=auto:6", "draft.dynamic_pool=24", "draft.tree_calibration=2", "bench.max_len=512", f"hydra.run.dir={run}")
    report = json.loads((run / "report.json").read_text())
    assert report["identical_to_ar"] is True and report["methods"]["amphista"]["identical_to_ar"]
    tree = report["trees"]["amphista"]
    assert tree["nodes"] == 7 and tree["dynamic_pool"]["nodes"] == 25 and len(tree["dynamic_pool"]["choices"]) == 24


def test_bench_refuses_a_dynamic_pool_smaller_than_its_tree(monkeypatch, capsys, tmp_path, tiny_llama_dir, drafters):
    with pytest.raises(SystemExit) as e:
        _cli(monkeypatch, "draft", "bench", f"model.name_or_path={tiny_llama_dir}", f"draft.checkpoint={drafters['amphista']}",
             "bench.num_questions=1", "bench.max_new_tokens=4", "bench.methods=[ar,amphista]", "draft.tree=auto:6",
             "draft.dynamic_pool=2", "draft.tree_calibration=1", "bench.max_len=512", f"hydra.run.dir={tmp_path}")
    assert e.value.code == 2
    assert "pool of 2 paths is smaller than its tree of 6" in capsys.readouterr().err


@pytest.mark.parametrize("override,msg", [
    ("bench.methods=[ar,eagle]", "unknown"),
    ("draft.tree=[[0],[1,0]]", "no parent"),
    ("draft.tree_accuracy=joint", "draft.tree_accuracy must be one of conditional, marginal"),
    ("draft.dynamic_pool=-1", "draft.dynamic_pool must be >= 0"),
    ("engine.cuda_graphs=maybe", "engine.cuda_graphs must be one of auto, true, false, got 'maybe'"),
    ("bench.max_new_tokens=100000", "exceeds the context"),
])
def test_bench_bad_input_is_one_clear_error(monkeypatch, capsys, tmp_path, tiny_llama_dir, drafters, override, msg):
    with pytest.raises(SystemExit) as e:
        _cli(monkeypatch, "draft", "bench", f"model.name_or_path={tiny_llama_dir}", f"draft.checkpoint={drafters['amphista']}",
             "bench.num_questions=1", "bench.max_len=256", override, f"hydra.run.dir={tmp_path}")
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_drafter_for_another_base_model_is_refused(monkeypatch, capsys, tmp_path, tiny_llama_dir):
    from tests.conftest import build_tiny_llama

    other = build_tiny_llama(300)
    path = save_drafter(build_drafter(DrafterConfig(kind="medusa", num_heads=2), target=other), tmp_path / "other", target_dims(other))
    with pytest.raises(SystemExit):
        _cli(monkeypatch, "draft", "bench", f"model.name_or_path={tiny_llama_dir}", f"draft.checkpoint={path}",
             "bench.num_questions=1", "bench.max_new_tokens=4", "bench.methods=[ar,medusa]", f"hydra.run.dir={tmp_path / 'r'}")
    err = capsys.readouterr().err
    assert "does not fit this target" in err and "hidden size" in err


@pytest.mark.parametrize("command", ["bench", "serve"])
def test_a_truncated_drafter_is_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path, tiny_llama_dir, drafters, command):
    import shutil

    import plmtool.models

    ckpt = shutil.copytree(drafters["amphista"], tmp_path / "copy")
    weights = ckpt / "drafter.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the checkpoint was checked")

    monkeypatch.setattr(plmtool.models, "load_model", no_load)
    with pytest.raises(SystemExit) as e:
        _cli(monkeypatch, "draft", command, f"model.name_or_path={tiny_llama_dir}", f"draft.checkpoint={ckpt}",
             f"hydra.run.dir={tmp_path / 'run'}")
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith(f"plmtool: error: {weights}: ") and "truncated or corrupt" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_serve_dry_run(monkeypatch, capsys, tmp_path, tiny_llama_dir, drafters):
    run = tmp_path / "serve"
    _cli(monkeypatch, "draft", "serve", "experiment=smoke", f"model.name_or_path={tiny_llama_dir}",
         f"draft.checkpoint={drafters['amphista']}", "draft.tree=chain", f"hydra.run.dir={run}")
    # the terminal says that nothing was served, and how to serve
    out = capsys.readouterr().out.splitlines()
    assert "dry run: server built (model, drafter, tree checked); not serving — drop serve.dry_run to serve" in out
    report = json.loads((run / "report.json").read_text())
    assert report["drafter"] == "amphista" and report["tree_nodes"] == 4 and report["host"] == "127.0.0.1"
    assert report["engine"] == dataclasses.asdict(EngineOptions())
    assert report["max_batch"] == 4 and report["batch_buckets"] == [1, 2, 4]  # the CPU default
    assert report["dry_run"] is True and report["served"] == 0


def test_engine_options_reach_the_engine_and_the_report(monkeypatch, tmp_path, tiny_llama_dir, drafters):
    run = tmp_path / "serve"
    _cli(monkeypatch, "draft", "serve", "experiment=smoke", f"model.name_or_path={tiny_llama_dir}",
         f"draft.checkpoint={drafters['medusa']}", "draft.tree=chain", "engine.drafter_graph=false", "engine.sync_check=true",
         f"hydra.run.dir={run}")
    report = json.loads((run / "report.json").read_text())
    assert report["engine"] == {**dataclasses.asdict(EngineOptions()), "drafter_graph": False, "sync_check": True}
    assert report["drafter"] == "medusa"


def test_interleaved_benchmark_cuts_every_method_after_the_same_questions():
    """With a deadline, question-major order stops all methods after the same questions (no method
    starved by the ones before it); caps limit a slow baseline; a failing method is reported."""
    import time

    import torch

    from plmtool.draft.bench.benchmark import Decoded, run_benchmark

    calls = []

    def method(name, seconds, fail=False):
        def run(prompt, max_new_tokens=None):
            calls.append(name)
            if fail:
                raise RuntimeError("boom")
            time.sleep(seconds)
            return Decoded(list(prompt) * 2, [2] * len(prompt))
        return run

    questions = [{"question_id": i, "category": "c", "prompt_ids": [i + 1]} for i in range(50)]
    methods = {"ar": method("ar", 0.01), "slow": method("slow", 0.03), "capped": method("capped", 0.01),
               "broken": method("broken", 0, fail=True)}
    errors = {}
    seen = []
    recs = run_benchmark(methods, questions, torch.device("cpu"), runs=1, warmup=1, question_caps={"capped": 2},
                         deadline=time.perf_counter() + 0.6, errors=errors, interleave=True,
                         on_question=lambda r: seen.append(len(r["ar"])), cold=["slow"])
    ids = {name: [r["question_id"] for r in rs] for name, rs in recs.items()}
    assert 3 <= len(ids["ar"]) < 50  # the deadline cut the run
    assert ids["slow"] == ids["ar"] and ids["capped"] == [0, 1]
    assert "broken" in errors and "broken" not in recs
    assert seen == list(range(1, len(ids["ar"]) + 1))
    # one warm-up call each, except the cold method; then one call per decoded question
    assert calls.count("ar") == len(ids["ar"]) + 1 and calls.count("slow") == len(ids["slow"])


def test_interleaved_benchmark_survives_warmup_errors_and_stops_cleanly_on_a_device_fault(monkeypatch):
    """A method whose warm-up raises is dropped and the others are benchmarked; after a device
    fault (a dead CUDA context fails every later kernel) the pass stops and returns the questions
    every method finished instead of dying in the next method's timer."""
    import torch

    from plmtool.draft.bench import benchmark
    from plmtool.draft.bench.benchmark import DEVICE_FAULT, Decoded, run_benchmark

    state = {"dead": False, "calls": 0}

    def ok(prompt, max_new_tokens=None):
        return Decoded(list(prompt) * 2, [2] * len(prompt))

    def bad_warmup(prompt, max_new_tokens=None):
        raise ValueError("shape mismatch")

    def faulty(prompt, max_new_tokens=None):
        state["calls"] += 1
        if state["calls"] == 3:  # warm-up, question 0, then faults on question 1
            state["dead"] = True
            raise RuntimeError("CUDA error: unspecified launch failure")
        return ok(prompt)

    monkeypatch.setattr(benchmark, "device_dead", lambda device: state["dead"])
    questions = [{"question_id": i, "category": "c", "prompt_ids": [i + 1]} for i in range(6)]
    errors: dict[str, str] = {}
    recs = run_benchmark({"ar": ok, "bad": bad_warmup, "other": ok, "faulty": faulty, "last": ok}, questions,
                         torch.device("cpu"), runs=1, warmup=1, errors=errors, interleave=True)
    assert errors["bad"] == "ValueError: shape mismatch"
    assert errors["faulty"].startswith(DEVICE_FAULT)
    assert set(recs) == {"ar", "other", "faulty", "last"}
    # question 1 was cut where the fault hit: every method keeps exactly question 0
    assert {name: [r["question_id"] for r in rs] for name, rs in recs.items()} == {n: [0] for n in recs}

    def dies_in_warmup(prompt, max_new_tokens=None):
        state["dead"] = True
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    state["dead"] = False  # a fault during the warm-ups: nothing to report, and no crash
    errors = {}
    assert run_benchmark({"ar": ok, "faulty": dies_in_warmup}, questions, torch.device("cpu"), runs=1, warmup=1,
                         errors=errors, interleave=True) == {}
    assert errors["faulty"].startswith(DEVICE_FAULT)


# ----------------------------------------------------------------------------- scripts/bench_draft.py


def _bench_script():
    from tests.conftest import load_script

    return load_script("bench_draft")


def test_bench_script_reads_plain_and_compressed_data(tmp_path):
    import gzip
    import lzma

    bench = _bench_script()
    data = {"conversations": [[{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "hi"}]], "questions": []}
    text = json.dumps(data).encode("utf-8")
    (tmp_path / "d.json").write_bytes(text)
    (tmp_path / "d.json.gz").write_bytes(gzip.compress(text))
    (tmp_path / "d.json.xz").write_bytes(lzma.compress(text))
    for name in ("d.json", "d.json.gz", "d.json.xz"):
        assert bench._load_data(str(tmp_path / name)) == data, name


def test_bench_script_reuses_only_a_finished_drafter_of_the_same_config(tmp_path):
    import dataclasses

    import torch

    from plmtool.draft.config import DraftTrainerConfig
    from plmtool.draft.train import CHECKPOINT, _config_key

    bench = _bench_script()
    cfg, trainer = DrafterConfig(kind="amphista", num_heads=3), DraftTrainerConfig(max_steps=6, labels="target")
    run = tmp_path / "amphista"
    assert not bench._finished(run, cfg, trainer)  # nothing there
    (run / "checkpoints").mkdir(parents=True)
    (run / "train_metrics.json").write_text("{}")
    torch.save({"step": 4, "config": _config_key(cfg, trainer)}, run / CHECKPOINT)
    assert not bench._finished(run, cfg, trainer)  # stopped at step 4 of 6: resumed, not reused
    torch.save({"step": 6, "config": _config_key(cfg, trainer)}, run / CHECKPOINT)
    assert bench._finished(run, cfg, trainer)
    assert not bench._finished(run, cfg, dataclasses.replace(trainer, lr=5e-4))
    assert not bench._finished(run, cfg, dataclasses.replace(trainer, labels="data"))
    assert not bench._finished(run, dataclasses.replace(cfg, num_heads=4), trainer)
    # logging and caching settings do not make it another run
    assert bench._finished(run, cfg, dataclasses.replace(trainer, log_every=1, cache_hidden_max_gb=40.0))


def test_bench_script_reads_drafter_settings_and_dynamic_tree_sizes():
    bench = _bench_script()
    assert bench._overrides(["stage_layers=[2,2]", "auto_embedding_layers=2", "use_auto_embedding=false"]) == {
        "stage_layers": [2, 2], "auto_embedding_layers": 2, "use_auto_embedding": False}
    with pytest.raises(SystemExit, match="key=value"):
        bench._overrides(["stage_layers"])
    assert bench._dynamic_sizes("256:1024, 64") == [(256, 1024), (64, 256)]
    with pytest.raises(SystemExit, match="smaller than the tree"):
        bench._dynamic_sizes("256:128")
    with pytest.raises(SystemExit, match="given twice"):
        bench._dynamic_sizes("256:512,256:1024")
