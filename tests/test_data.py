"""Corpora, calibration sampling and chat loaders."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from plmtool.data import chat, corpora
from plmtool.data.calibration import calibration_windows
from plmtool.errors import PlmtoolError


def data_cfg(**kw):
    base = dict(corpus="wiki_sample", calib_corpus=None, nsamples=4, seqlen=64, seed=0, text_field="text", cache_dir=None)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("name", ["wiki_sample", "news_sample"])
def test_embedded_splits_are_disjoint_and_cover_everything(name):
    calib = corpora.load_documents(name, "calib")
    val = corpora.load_documents(name, "val")
    evals = corpora.load_documents(name, "eval")
    assert len(calib) > 3 * len(evals) > 0 and len(evals) > len(val) > 0
    assert not set(calib) & set(evals) and not set(val) & set(evals) and not set(val) & set(calib)
    # every document is in exactly one split (duplicates of the raw corpus counted once)
    if name == "wiki_sample":
        assert len(calib) + len(val) + len(evals) == len({a["text"] for a in corpora._wiki_articles(None)})


def test_wiki_sample_is_clean_prose():
    docs = corpora.load_documents("wiki_sample", "eval")
    text = "\n".join(docs)
    assert len(text.split()) > 50_000
    for markup in ("[[", "]]", "{{", "}}", "<ref", "'''", "[http"):
        assert markup not in text, markup
    assert "Alabama is a state" in text


def test_calibration_windows_are_seeded_and_come_from_calibration_text_only(tiny_tokenizer):
    cfg = data_cfg(corpus="news_sample", nsamples=6, seqlen=32)
    a = calibration_windows(tiny_tokenizer, cfg)
    b = calibration_windows(tiny_tokenizer, cfg)
    c = calibration_windows(tiny_tokenizer, data_cfg(corpus="news_sample", nsamples=6, seqlen=32, seed=1))
    assert a.shape == (6, 32)
    assert (a == b).all() and not (a == c).all()
    calib_text = corpora.joined_text("news_sample", "calib")
    eval_docs = corpora.load_documents("news_sample", "eval")
    for row in a:
        window = tiny_tokenizer.decode(row[4:-4])  # interior: edges may split a byte-level token
        assert window in calib_text
        assert not any(window in doc for doc in eval_docs)


def test_calib_corpus_overrides_corpus(tiny_tokenizer):
    a = calibration_windows(tiny_tokenizer, data_cfg(corpus="wiki_sample", calib_corpus="news_sample", nsamples=2, seqlen=16))
    b = calibration_windows(tiny_tokenizer, data_cfg(corpus="news_sample", nsamples=2, seqlen=16))
    assert (a == b).all()


def test_local_text_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(f"document number {i} with some words" for i in range(10)))
    assert len(corpora.load_documents(str(txt), "eval")) == 2
    assert len(corpora.load_documents(str(txt), "calib")) == 7
    assert corpora.load_documents(str(txt), "val") == ["document number 3 with some words"]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(5)) + "\n{broken\n")
    with pytest.raises(PlmtoolError, match=r"c\.jsonl:6: malformed JSON"):
        corpora.load_documents(str(jl), "eval", data_cfg(text_field="body"))


def test_unknown_corpus_and_short_corpus(tiny_tokenizer, tmp_path):
    with pytest.raises(PlmtoolError, match="unknown corpus 'nope'"):
        corpora.load_documents("nope", "eval")
    small = tmp_path / "s.txt"
    small.write_text("\n\n".join(["a b c"] * 5))
    with pytest.raises(PlmtoolError, match="fewer than one window"):
        calibration_windows(tiny_tokenizer, data_cfg(corpus=str(small), seqlen=512))


def test_json_array_recovery_stops_at_truncation():
    items = [{"id": i, "conversations": []} for i in range(3)]
    text = json.dumps(items, indent=2)
    cut = text[: text.rindex('"id": 2') + 4]  # cut inside the third object
    assert [o["id"] for o in chat.iter_json_array(cut)] == [0, 1]
    assert [o["id"] for o in chat.iter_json_array(text)] == [0, 1, 2]


def test_embedded_sharegpt_recovers_complete_conversations():
    convs = chat.load_sharegpt()
    assert len(convs) > 15_000
    for conv in convs[:500]:
        body = [m for m in conv if m["role"] != "system"]
        assert body[0]["role"] == "user" and body[-1]["role"] == "assistant"
        assert all(a["role"] != b["role"] for a, b in zip(body, body[1:]))


def test_sharegpt_edge_trimming():
    rec = {"conversations": [{"from": "gpt", "value": "tail of an earlier answer"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "unanswered"}]}
    assert chat.sharegpt_to_messages(rec) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert chat.sharegpt_to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}) is None


def test_chat_jsonl_formats_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"
        + json.dumps({"instruction": "add", "input": "1+1", "output": "2"}) + "\n"
    )
    convs = chat.load_chat_jsonl(f)
    assert convs[1] == [{"role": "user", "content": "add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(PlmtoolError, match=r"bad\.jsonl:3: missing field 'output'"):
        chat.load_chat_jsonl(bad)


def test_mtbench_questions():
    qs = chat.load_mtbench()
    assert len(qs) == 80
    assert {q["category"] for q in qs} == {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
    assert all(len(q["turns"]) == 2 for q in qs)
