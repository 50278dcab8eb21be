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

REPO = Path(__file__).resolve().parents[1]


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


def test_unknown_task_is_a_clear_error(tmp_path):
    from plmtool.eval.zeroshot import check_task_names

    with pytest.raises(PlmtoolError, match="unknown lm-eval task.*no_such_task.*include_path"):
        check_task_names(["wiki_next_sentence", "no_such_task"])
    with pytest.raises(PlmtoolError, match="no such directory"):
        check_task_names(["rte"], include_path=str(tmp_path / "missing"))
    check_task_names(["wiki_next_sentence", "rte", "storycloze_2016"])  # known names pass


# --- lm-eval on a tiny random model, fully offline, in a clean process ---------------------------

TINY_RUN = textwrap.dedent(
    r"""
    import json, sys
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import plmtool.eval.offline_task as offline_task
    from plmtool.eval.offline_task import build_task, generate_examples
    from plmtool.eval.zeroshot import zeroshot

    out_dir = sys.argv[1]
    # A byte-level tokenizer built in code: one token per byte, nothing downloaded.
    # (the printable stand-ins ByteLevel uses for the 256 byte values, as in GPT-2)
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    stand_in = {b: chr(b) for b in keep}
    stand_in.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in stand_in)})
    vocab = {ch: i for i, ch in enumerate(stand_in[b] for b in range(256))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)).eval()

    docs = json.load(open(out_dir + "/docs.json"))
    # The suite builds the task from wiki_sample; here it is built from the given documents.
    offline_task.offline_task_dir = lambda size, choices, seed, data_cfg=None: build_task(
        docs, size, choices, seed, root=out_dir + "/tasks")
    acc, acc_norm = zeroshot(model, tok, ["wiki_next_sentence"], out_dir, "tiny", batch_size=4, limit=12,
                             offline_task_size=30, offline_task_choices=3)

    # Independent reference: score every choice with a plain forward pass.
    examples = generate_examples(docs, 30, 3, 0)[:12]
    hits = hits_norm = 0
    with torch.no_grad():
        for ex in examples:
            ctx = tok.encode(ex["context"])
            scores = []
            for choice in ex["choices"]:
                ids = tok.encode(ex["context"] + " " + choice)
                assert ids[: len(ctx)] == ctx
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
                target = torch.tensor(ids[len(ctx):])
                scores.append(logp[len(ctx) - 1 :].gather(1, target[:, None]).sum().item())
            hits += max(range(3), key=lambda k: scores[k]) == ex["label"]
            hits_norm += max(range(3), key=lambda k: scores[k] / len(ex["choices"][k])) == ex["label"]
    print(json.dumps({"acc": acc, "acc_norm": acc_norm, "ref_acc": hits / 12, "ref_acc_norm": hits_norm / 12}))
    """
)


def test_lm_eval_runs_offline_task_on_tiny_model_offline(tmp_path):
    (tmp_path / "docs.json").write_text(json.dumps(SYNTHETIC))
    script = tmp_path / "run.py"
    script.write_text(TINY_RUN)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
        "PLMTOOL_CACHE": str(tmp_path / "plmtool"),
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # lm-eval's accuracy equals a direct scoring loop on the same examples.
    assert got["acc"]["wiki_next_sentence"] == pytest.approx(got["ref_acc"])
    assert got["acc_norm"]["wiki_next_sentence"] == pytest.approx(got["ref_acc_norm"])
    results = json.loads((tmp_path / "lm_eval_tiny.json").read_text())
    assert "samples" not in results
    entry = results["results"]["wiki_next_sentence"]
    assert entry["acc,none"] == got["acc"]["wiki_next_sentence"] and entry["sample_len"] == 12
    # Nothing went to the default HF cache: the datasets cache in the temp dir holds the json build.
    assert (tmp_path / "hf" / "datasets").is_dir()
