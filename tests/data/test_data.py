"""Corpora, calibration sampling and chat loaders."""

from __future__ import annotations

import copy
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


def test_non_utf8_corpus_is_one_line_naming_file_line_and_byte(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first document\n\nun café au lait\n\nthird".encode("latin-1"))
    with pytest.raises(PlmtoolError) as e:
        corpora.check_corpus(str(latin1))
    assert str(e.value) == f"{latin1}:3: not UTF-8 text (byte 0xe9 at offset 22); convert the file to UTF-8"
    jl = tmp_path / "c.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PlmtoolError, match=r"c\.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 28\)"):
        corpora.load_documents(str(jl), "eval")
    # a missing file is named before anything loads; the named corpora are not read here
    with pytest.raises(PlmtoolError, match="unknown corpus .*no file at"):
        corpora.check_corpus(str(tmp_path / "missing.txt"))
    corpora.check_corpus("c4")


def test_unknown_corpus_and_short_corpus(tiny_tokenizer, tmp_path):
    with pytest.raises(PlmtoolError, match="unknown corpus 'nope'"):
        corpora.load_documents("nope", "eval")
    small = tmp_path / "s.txt"
    small.write_text("\n\n".join(["a b c"] * 5))
    with pytest.raises(PlmtoolError, match="fewer than one window"):
        calibration_windows(tiny_tokenizer, data_cfg(corpus=str(small), seqlen=512))


def test_json_array_reading_stops_at_the_cut_off_tail_only_where_asked():
    items = [{"id": i, "conversations": []} for i in range(3)]
    text = json.dumps(items, indent=2)
    cut = text[: text.rindex('"id": 2') + 4]  # cut inside the third object
    assert [o for _, _, o in chat.iter_json_array(cut, "f", truncated_tail=True)] == [items[0], items[1], ...]
    assert [o for _, _, o in chat.iter_json_array(text, "f", truncated_tail=True)] == items
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(cut)
    with pytest.raises(PlmtoolError, match=rf"^f: line {ref.value.lineno} column {ref.value.colno} \(record 3\): malformed JSON"):
        list(chat.iter_json_array(cut, "f"))  # any other file: the cut is an error
    for bad in ("[1,]", "[1 2]", "[1] x", "[1, 2"):
        with pytest.raises(PlmtoolError, match="^f: line 1 column .*malformed JSON"):
            list(chat.iter_json_array(bad, "f"))
    assert list(chat.iter_json_array(" [ ] ", "f")) == []


def sharegpt_record(i: int, turns=("human", "gpt")) -> dict:
    return {"id": f"r{i}", "conversations": [{"from": who, "value": f"turn {j} of {i}"} for j, who in enumerate(turns)]}


def test_user_sharegpt_json_with_a_syntax_error_names_file_line_column_and_record(tmp_path):
    records = [json.dumps(sharegpt_record(i), indent=2) for i in range(50)]
    records[30] = records[30].replace('"human",', '"human"', 1)  # the 31st record misses a comma
    f = tmp_path / "chats.json"
    f.write_text("[\n" + ",\n".join(records) + "\n]\n")
    with pytest.raises(json.JSONDecodeError) as ref:  # the independent reference for the position
        json.loads(f.read_text())
    with pytest.raises(PlmtoolError) as err:
        chat.load_chat(str(f), limit=10)  # a user file is checked whole, past the limit too
    assert str(err.value).startswith(f"{f}: line {ref.value.lineno} column {ref.value.colno} (record 31): malformed JSON")
    assert "\n" not in str(err.value)


def test_a_json_object_instead_of_an_array_is_one_line_naming_the_file(tmp_path):
    f = tmp_path / "one.json"
    f.write_text(json.dumps(sharegpt_record(0)))
    with pytest.raises(PlmtoolError, match=rf"^{f}: line 1 column 1: expected a JSON array of conversations, found an object$"):
        chat.load_chat(str(f))


def test_embedded_sharegpt_passes_over_its_cut_off_tail_and_counts_what_it_skips():
    from plmtool.data.embedded import embedded_file

    data = chat.load_chat("sharegpt")
    # reference: the complete records, parsed by json itself up to the last complete one
    text = embedded_file("sharegpt").read_text(encoding="utf-8")
    complete = json.loads(text[: text.rindex("\n  },") + 4] + "]")
    assert data.skipped["truncated"] == 1
    assert len(data.samples) + sum(n for why, n in data.skipped.items() if why != "truncated") == len(complete)
    assert len(data.samples) > 15_000 and "cut off at the end of the embedded ShareGPT file" in chat.skipped_line(data.skipped)
    for conv in data.conversations[:500]:
        body = [m for m in conv if m["role"] != "system"]
        assert body[0]["role"] == "user" and body[-1]["role"] == "assistant"
        assert all(a["role"] != b["role"] for a, b in zip(body, body[1:]))
    first = chat.load_chat("sharegpt", limit=100)
    assert first.samples == data.samples[:100] and "truncated" not in first.skipped  # read only as far as needed


def test_conversation_rules_trim_chunk_edges_and_skip_what_cannot_train(tmp_path):
    def conv(*roles, content="x"):
        return [{"role": r, "content": content} for r in roles]

    trimmed, why = chat.training_conversation(conv("assistant", "user", "assistant", "user"))
    assert trimmed == conv("user", "assistant") and why is None
    assert chat.training_conversation(conv("system", "user", "assistant"))[0] == conv("system", "user", "assistant")
    assert chat.training_conversation(conv("user", "system", "assistant")) == (None, "system_not_first")
    assert chat.training_conversation(conv("user", "user", "assistant")) == (None, "not_alternating")
    assert chat.training_conversation(conv("assistant", "user")) == (None, "no_exchange")
    assert chat.training_conversation(conv("user", "assistant", content=" ")) == (None, "empty_turn")
    # the same rules for every format; each skipped record counted by its reason
    f = tmp_path / "mixed.jsonl"
    rows = [{"messages": conv("user", "assistant")}, sharegpt_record(1, ("human", "human", "gpt")),
            {"instruction": "add", "input": "1+1", "output": "2"}, {"instruction": "x", "output": ""},
            {"conversations": [{"from": "gpt", "value": "alone"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = chat.load_chat(str(f))
    assert data.conversations == [conv("user", "assistant"), [{"role": "user", "content": "add\n\n1+1"}, {"role": "assistant", "content": "2"}]]
    assert data.skipped == {"not_alternating": 1, "empty_turn": 1, "no_exchange": 1}
    assert [s["id"] for s in data.samples] == ["mixed-1", "mixed-3"]


def test_chat_jsonl_formats_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "task": "greet"}) + "\n"
        + json.dumps({"instruction": "add", "input": "1+1", "output": "2", "id": "sum"}) + "\n"
    )
    data = chat.load_chat(str(f))
    assert data.conversations[1] == [{"role": "user", "content": "add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    assert [(s["id"], s["task"]) for s in data.samples] == [("d-1", "greet"), ("sum", None)]
    cases = {
        json.dumps({"instruction": "x", "output": "y"}) + "\n\n" + json.dumps({"instruction": "x"}): r"bad\.jsonl:3: missing field 'output'",
        "{broken\n": r"bad\.jsonl:1: malformed JSON",
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}): r"bad\.jsonl:1: message 0 has role 'robot'",
        json.dumps([1, 2]): r"bad\.jsonl:1: expected a JSON object",
        "\n": r"bad\.jsonl: no usable conversations",
    }
    bad = tmp_path / "bad.jsonl"
    for text, msg in cases.items():
        bad.write_text(text + "\n")
        with pytest.raises(PlmtoolError, match=msg):
            chat.load_chat(str(bad))


def test_heldout_split_is_seeded_disjoint_and_leaves_one_to_train():
    train, held = chat.split_heldout(20, 5, seed=3)
    assert len(held) == 5 and sorted(train + held) == list(range(20)) and train == sorted(train) and held == sorted(held)
    assert chat.split_heldout(20, 5, seed=3) == (train, held) and chat.split_heldout(20, 5, seed=4) != (train, held)
    assert chat.split_heldout(3, 10, seed=0)[0] != [] and chat.split_heldout(3, 0, seed=0) == ([0, 1, 2], [])


def test_assistant_tokens_mark_the_replies_and_their_end_of_turn_marker(tiny_tokenizer):
    from plmtool.data.chat_tokens import assistant_tokens

    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count from 3"},
            {"role": "assistant", "content": "3 4 5"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "6 7"}]
    ids, mask = assistant_tokens(tiny_tokenizer, conv, 512)
    assert tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "3 4 5<|im_end|>6 7<|im_end|>"
    # without a chat template: a plain layout, the same tokens supervised
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    ids, mask = assistant_tokens(plain, conv, 512)
    assert tiny_tokenizer.decode(ids).startswith("System: be brief\nUser: count from 3\nAssistant: 3 4 5<|im_end|>\n")
    assert plain.decode([i for i, m in zip(ids, mask) if m]) == "3 4 5<|im_end|>6 7<|im_end|>"
    # a long instruction is cut first, so that the reply stays in the window
    long = [{"role": "user", "content": "count " * 200}, {"role": "assistant", "content": "3 4 5"}]
    ids, mask = assistant_tokens(tiny_tokenizer, long, 64, max_prompt_len=16)
    assert len(ids) < 64 and tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "3 4 5<|im_end|>"


def test_mtbench_questions():
    qs = chat.load_mtbench()
    assert len(qs) == 80
    assert {q["category"] for q in qs} == {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
    assert all(len(q["turns"]) == 2 for q in qs)
