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

BYTE_TOKENIZER = textwrap.dedent(
    """
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
    """
)
_ns: dict = {}
exec(BYTE_TOKENIZER, _ns)
byte_tokenizer = _ns["byte_tokenizer"]


def tiny_llama(max_positions: int = 4096):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    return LlamaForCausalLM(cfg).eval()


TINY_RUN = BYTE_TOKENIZER + textwrap.dedent(
    r"""
    import json, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import plmtool.eval.offline_task as offline_task
    from plmtool.eval.offline_task import build_task, generate_examples
    from plmtool.eval.zeroshot import zeroshot

    out_dir = sys.argv[1]
    tok = byte_tokenizer()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64,
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


# Measured with these settings (bf16, first 100 examples): dense acc 0.37 / acc_norm 0.42, 70%
# magnitude-pruned 0.25 / 0.27 (chance 0.25). The bounds leave room for a few flipped examples
# across CPUs' bf16 kernels.
REAL_LIMIT = 100
DENSE_MIN = 0.32
MARGIN = 0.08


@pytest.mark.real_model
def test_offline_task_separates_smollm2_from_damaged_smollm2():
    from omegaconf import OmegaConf

    from plmtool.config import ModelConfig
    from plmtool.eval.zeroshot import zeroshot
    from plmtool.models import load_model

    # bf16 on CPU is 2.5-3.5x faster; lm-eval's log-softmax stays fp32 (softmax_dtype).
    model, tok = load_model(OmegaConf.structured(ModelConfig(dtype="bfloat16")))
    kwargs = dict(batch_size=16, limit=REAL_LIMIT, offline_task_size=500, offline_task_choices=4)
    dense, dense_norm = zeroshot(model, tok, ["wiki_next_sentence"], **kwargs)
    _magnitude_prune_decoder_linears(model, 0.7)
    damaged, damaged_norm = zeroshot(model, tok, ["wiki_next_sentence"], **kwargs)
    task = "wiki_next_sentence"
    print(f"dense acc {dense[task]:.3f} acc_norm {dense_norm[task]:.3f}; "
          f"70% magnitude acc {damaged[task]:.3f} acc_norm {damaged_norm[task]:.3f}")
    assert dense[task] >= DENSE_MIN, dense  # chance is 0.25
    assert damaged[task] <= dense[task] - MARGIN, (dense, damaged)
    assert damaged_norm[task] <= dense_norm[task] - MARGIN, (dense_norm, damaged_norm)
