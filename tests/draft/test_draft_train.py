"""Drafter training: label alignment, gradients, loss going down, resume, the command end to end."""

from __future__ import annotations

import json
import time

import pytest
import torch

from plmtool.draft.config import DraftDataConfig, DrafterConfig, DraftTrainerConfig
from plmtool.draft.data import build_examples, collate, tokenize_conversation
from plmtool.draft.drafter import build_drafter, load_drafter, target_hidden
from plmtool.draft.train import (DraftLoss, _target_outputs, head_targets, head_weights, next_tokens_of, target_predictions,
                                 train_drafter)
from plmtool.errors import PlmtoolError
from tests.conftest import build_tiny_llama, build_tiny_tokenizer, one_thread
from tests.draft.train_helpers import save_tiny_checkpoint, tiny_conversations, write_chat_jsonl


_single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_head_targets_align_head_k_with_token_t_plus_2_plus_k():
    ids = torch.arange(10)[None] + 100
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :4] = False  # prompt tokens are never labels
    for k in range(3):
        valid, labels = head_targets(ids, mask, k)
        for t in range(10):
            assert bool(valid[0, t]) == (t + 2 + k < 10 and t + 2 + k >= 4)
            if valid[0, t]:
                assert int(labels[0, t]) == int(ids[0, t + 2 + k])
    assert next_tokens_of(ids, -1)[0].tolist() == list(range(101, 110)) + [-1]


def test_target_labels_are_the_targets_greedy_prediction_of_token_t_plus_2_plus_k(tok):
    # independent reference: the Hugging Face forward's own logits
    target = build_tiny_llama(len(tok))
    ex = build_examples(tok, tiny_conversations(3), 96)
    ids, attn, mask = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        greedy = target(input_ids=ids, attention_mask=attn).logits.argmax(-1)  # greedy[t] guesses ids[t+1]
        pred = target_predictions(target, target_hidden(target, ids, attn), rows_per_chunk=2)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as in bf16 training: labels stay the fp32 target's
            pred_autocast = target_predictions(target, target_hidden(target, ids, attn).float())
    assert torch.equal(pred, greedy) and torch.equal(pred_autocast, greedy)
    for k in range(3):
        valid, labels = head_targets(ids, mask, k, pred)
        assert torch.equal(valid, head_targets(ids, mask, k)[0])  # same supervised positions
        for b, t in valid.nonzero().tolist():
            assert int(labels[b, t]) == int(greedy[b, t + 1 + k])
    # the hidden-state cache hands back the same predictions as a fresh forward
    cache: dict = {}
    keys = list(range(ids.shape[0]))
    h0, p0 = _target_outputs(target, ids, attn, keys, cache, predictions=True)
    h1, p1 = _target_outputs(target, ids, attn, keys, cache, predictions=True)
    lengths = attn.sum(1).tolist()
    for b, n in enumerate(lengths):
        assert torch.equal(p0[b, :n], p1[b, :n]) and torch.equal(p0[b, :n], greedy[b, :n])
        assert torch.allclose(h0[b, :n], h1[b, :n])


def test_training_on_target_labels_reports_accuracy_against_them(tmp_path, tok):
    target = build_tiny_llama(len(tok))
    m = _train(tok, target, tmp_path, 6, labels="target")
    assert m["labels"] == "target" and len(m["heads"]["top1"]) == 2
    with pytest.raises(PlmtoolError, match="trainer.labels must be one of data, target"):
        _train(tok, target, tmp_path / "bad", 2, labels="joint")
    # a run dir trained on the data's tokens does not resume with target labels, and says why
    _train(tok, target, tmp_path / "d", 4, labels="data")
    with pytest.raises(PlmtoolError, match="trainer.labels: None there, 'target' now"):
        _train(tok, target, tmp_path / "d", 6, labels="target")


def test_assistant_mask_covers_replies_only(tok):
    conv = [{"role": "user", "content": "count from 3"}, {"role": "assistant", "content": "3 4 5"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "6 7"}]
    ids, mask = tokenize_conversation(tok, conv, 512)
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == "3 4 5<|im_end|>6 7<|im_end|>"
    ids, mask = tokenize_conversation(tok, conv, 20)  # truncation keeps ids and mask aligned
    assert len(ids) == len(mask) == 20


def test_label_alignment_is_learned(tok):
    # Replies are the same fixed string of distinct characters: from position t the tokens at
    # t+2+k are fully determined, so a correctly aligned head k becomes exact, and checking its
    # argmax against t+1+k or t+3+k (off by one) fails.
    target = build_tiny_llama(len(tok))
    reply = "abcdefghijklmnopqrstuvwxyz"
    convs = [[{"role": "user", "content": f"go {i}"}, {"role": "assistant", "content": reply}] for i in range(8)]
    drafter = build_drafter(DrafterConfig(kind="medusa", num_heads=3, share_lm_head=False), target)
    ex = build_examples(tok, convs, 128)
    ids, attn, mask = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        hidden = target_hidden(target, ids, attn)
    loss_fn = DraftLoss(drafter, head_weights(3, 1.0), tok.pad_token_id)
    opt = torch.optim.Adam(drafter.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss, _ = loss_fn(hidden, ids, mask)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = drafter(hidden, ids).argmax(-1)  # [B, T, K]
    for k in range(3):
        valid, labels = head_targets(ids, mask, k)
        acc = (pred[..., k][valid] == labels[valid]).float().mean()
        assert acc > 0.95, (k, acc)
        # off-by-one labels: token at t+1+k
        shifted = torch.zeros_like(ids)
        shifted[:, : -(1 + k)] = ids[:, 1 + k :]
        assert (pred[..., k][valid] == shifted[valid]).float().mean() < 0.2


@pytest.mark.parametrize("kind", ["medusa", "amphista"])
def test_every_head_and_component_receives_gradient(tok, kind):
    target = build_tiny_llama(len(tok))
    drafter = build_drafter(DrafterConfig(kind=kind, num_heads=3, share_lm_head=False), target)
    ex = build_examples(tok, tiny_conversations(4), 128)
    ids, attn, mask = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        hidden = target_hidden(target, ids, attn)
    loss_fn = DraftLoss(drafter, head_weights(3, 0.8), tok.pad_token_id)
    loss, stats = loss_fn(hidden, ids, mask)
    loss.backward()
    assert all(n > 0 for n, *_ in stats)
    for k in range(3):  # from the zero-initialised start, every head already learns
        assert drafter.lm_head.weight.grad[k].abs().sum() > 0  # per-head projections
        block = drafter.blocks[k] if kind == "medusa" else drafter.head_blocks[k]
        assert block[0].linear.weight.grad.abs().sum() > 0
    if kind == "amphista":
        assert (drafter.position.grad.abs().sum(-1) > 0).all()
        assert not drafter.embed.weight.requires_grad  # the target's embedding copy stays frozen
    # once the residual branches are non-zero (after a step), every trainable tensor gets gradient
    with torch.no_grad():
        for p in drafter.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    drafter.zero_grad()
    loss_fn(hidden, ids, mask)[0].backward()
    for name, p in drafter.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def _train(tok, target, out, steps, **trainer):
    cfg = DraftTrainerConfig(**{"max_steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 2,
                                "eval_every": 1000, "save_every": 4, "labels": "data", **trainer})
    return train_drafter(target, tok, DrafterConfig(kind="amphista", num_heads=2), cfg, tiny_conversations(20), out,
                         DraftDataConfig(heldout=4, max_seq_len=96))


def test_training_lowers_the_loss_and_writes_checkpoint_and_metrics(tmp_path, tok):
    target = build_tiny_llama(len(tok))
    m = _train(tok, target, tmp_path, 30)
    assert m["loss"]["last"] < 0.6 * m["loss"]["first"]
    assert len(m["heads"]["top1"]) == 2 and all(0 <= a <= 1 for a in m["heads"]["top1"])
    assert m["heads"]["top1"][0] > 0.3  # counting replies are easy to draft
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in records) and any("loss" in r for r in records)
    drafter = load_drafter(tmp_path / "drafter", target=target)
    assert drafter.num_heads == 2 and m["parameters"] == drafter.num_parameters()


def test_resume_continues_from_the_saved_step(tmp_path, tok, monkeypatch):
    target = build_tiny_llama(len(tok))
    straight = _train(tok, target, tmp_path / "a", 10)
    ref = load_drafter(tmp_path / "a" / "drafter").state_dict()

    # interrupt the second run after its step-8 checkpoint, then rerun into the same directory
    import plmtool.draft.train as train_mod

    calls = {"n": 0}
    real = train_mod.collate

    def failing_collate(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train_mod, "collate", failing_collate)
    with pytest.raises(KeyboardInterrupt):
        _train(tok, target, tmp_path / "b", 10)
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["step"] == 8
    monkeypatch.setattr(train_mod, "collate", real)
    resumed = _train(tok, target, tmp_path / "b", 10)
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [2, 4, 6, 8, 10]  # steps 9-10 ran once, after the resume
    got = load_drafter(tmp_path / "b" / "drafter").state_dict()
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-5), k
    assert resumed["heads"]["top1"] == straight["heads"]["top1"]
    # a different config cannot silently continue someone else's run
    with pytest.raises(PlmtoolError, match="different drafter/trainer config"):
        _train(tok, target, tmp_path / "b", 10, lr=1e-2)


def test_time_limit_checkpoints_and_the_rerun_finishes_the_same_drafter(tmp_path, tok, monkeypatch):
    """trainer.max_time_s stops training with a checkpoint of the step it reached; the same call
    again resumes and ends with the drafter an uninterrupted run trains."""
    from plmtool import train_loop

    target = build_tiny_llama(len(tok))
    straight = _train(tok, target, tmp_path / "a", 10)
    ref = load_drafter(tmp_path / "a" / "drafter").state_dict()
    assert not train_loop.TimeLimit(seconds=50).reached() and train_loop.TimeLimit(deadline=time.time() - 1).reached()
    clock = iter([0.0] * 4 + [1e12] * 1000)  # the start and the checks after steps 1-3 in time: time is up after step 4
    monkeypatch.setattr(train_loop, "now", lambda: next(clock))
    part = _train(tok, target, tmp_path / "b", 10, max_time_s=50)
    assert {k: v for k, v in part.items() if k != "wall_time_s"} == {
        "kind": "amphista", "finished": False, "steps_done": 4, "steps": 10,
        "checkpoint": str(tmp_path / "b" / "checkpoints" / "last.pt")}
    assert torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["step"] == 4
    assert not (tmp_path / "b" / "drafter").exists()  # no drafter from an unfinished run
    monkeypatch.setattr(train_loop, "now", time.time)
    done = _train(tok, target, tmp_path / "b", 10, max_time_s=50)  # the limit is not part of the run's config
    assert done["finished"] and done["heads"]["top1"] == straight["heads"]["top1"]
    got = load_drafter(tmp_path / "b" / "drafter").state_dict()
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-5), k
    with pytest.raises(PlmtoolError, match="max_time_s must be >= 0"):
        _train(tok, target, tmp_path / "c", 10, max_time_s=-1)


def test_command_end_to_end(tmp_path, tok, monkeypatch):
    from hydra import compose, initialize_config_dir

    from plmtool.commands.draft_train import render, run
    from plmtool.paths import CONF_DIR

    target = build_tiny_llama(len(tok))
    model_dir = save_tiny_checkpoint(tmp_path / "model", target, tok)
    data = write_chat_jsonl(tmp_path / "chats.jsonl", tiny_conversations(16))
    # two records that cannot train: skipped, and counted in the report
    with data.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q again"}]}) + "\n")
        f.write(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]}) + "\n")
    overrides = [
        f"model.name_or_path={model_dir}", "model.device=cpu", f"data.source={data}", "data.heldout=4",
        "data.max_seq_len=96", "draft.num_heads=2", "trainer.max_steps=6", "trainer.batch_size=4",
        "trainer.eval_every=3", "trainer.save_every=3", "trainer.log_every=3",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="draft_train", overrides=overrides)
    assert cfg.draft.kind == "amphista"  # the default drafter
    report = run(cfg, tmp_path / "run")
    assert len(report["heads"]["top1"]) == 2 and report["steps"] == 6 and report["drafter"] == "amphista"
    assert report["data"] == {"source": str(data), "conversations": 16, "skipped": {"not_alternating": 1, "empty_turn": 1},
                              "self_distill": False, "distilled_without_reply": 0}
    assert "(skipped 2 records: 1 with an empty turn, 1 with two turns of one role in a row)" in render(report)
    assert (tmp_path / "run" / "drafter" / "drafter.safetensors").is_file()
    conf = json.loads((tmp_path / "run" / "drafter" / "drafter_config.json").read_text())
    assert conf["base_model"]["name_or_path"] == str(model_dir) and conf["base_model"]["vocab_size"] == len(tok)

    assert report["medusa_export"] is None
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        medusa = compose(config_name="draft_train", overrides=[*overrides, "draft=medusa"])
    report = run(medusa, tmp_path / "medusa")
    assert report["drafter"] == "medusa" and (tmp_path / "medusa" / "medusa_export" / "medusa_lm_head.safetensors").is_file()

    # a time limit: a report that says so, no stage marked done; the same command then finishes
    from plmtool import train_loop

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        limited = compose(config_name="draft_train", overrides=[*overrides, "trainer.max_time_s=30"])
    clock = iter([0.0] + [1e12] * 1000)  # time is up at the first check
    monkeypatch.setattr(train_loop, "now", lambda: next(clock))
    paused = run(limited, tmp_path / "limited")
    monkeypatch.setattr(train_loop, "now", time.time)
    assert not paused["finished"] and paused["steps_done"] == 1 and "Rerun the same command to resume" in render(paused)
    finished = run(limited, tmp_path / "limited")
    assert finished["finished"] and finished["steps"] == 6 and "Held-out accuracy" in render(finished)

    # bad input is one clear error, before any model loads
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        bad = compose(config_name="draft_train", overrides=[*overrides, "data.source=/nonexistent.jsonl"])
        with pytest.raises(PlmtoolError, match="data.source"):
            run(bad, tmp_path / "bad")
        bad = compose(config_name="draft_train", overrides=[*overrides, "draft.kind=eagle"])
        with pytest.raises(PlmtoolError, match="draft.kind"):
            run(bad, tmp_path / "bad")


def test_self_distillation_replaces_replies_with_the_targets_own(tmp_path, tok):
    from plmtool.draft.data import generate_replies, self_distill

    target = build_tiny_llama(len(tok))
    convs = tiny_conversations(3)
    out = self_distill(target, tok, convs, tmp_path / "distill", max_new_tokens=6, batch_size=2)
    assert len(out) == 3 and [m["role"] for m in out[0]] == ["user", "assistant"]
    assert out[0][0] == convs[0][0]
    # the reply is exactly the target's greedy continuation of that prompt
    assert out[0][1]["content"] == generate_replies(target, tok, [convs[0][:1]], 6, 512)[0]
    # cached: a second call reads the parts instead of generating
    assert sorted(p.name for p in (tmp_path / "distill").iterdir()) == ["part-00000.jsonl", "part-00001.jsonl"]
    assert self_distill(None, tok, convs, tmp_path / "distill", max_new_tokens=6, batch_size=2) == out


def test_conversations_the_target_leaves_unanswered_are_counted_in_the_report(tmp_path, tok, monkeypatch):
    from hydra import compose, initialize_config_dir

    import plmtool.draft.data as data_mod
    from plmtool.commands.draft_train import render, run
    from plmtool.paths import CONF_DIR

    target = build_tiny_llama(len(tok))
    model_dir = save_tiny_checkpoint(tmp_path / "model", target, tok)
    data = write_chat_jsonl(tmp_path / "chats.jsonl", tiny_conversations(12))
    real = data_mod.generate_replies
    # the target answers nothing to the conversations that count from 0
    monkeypatch.setattr(data_mod, "generate_replies", lambda model, tok_, histories, *a: [
        "" if h[-1]["content"] == "count from 0" else r for h, r in zip(histories, real(model, tok_, histories, *a))])
    overrides = [f"model.name_or_path={model_dir}", "model.device=cpu", f"data.source={data}", "data.heldout=2",
                 "data.max_seq_len=96", "data.min_assistant_tokens=1", "data.self_distill=true", "data.distill_max_new_tokens=8",
                 "draft.num_heads=2", "trainer.max_steps=2", "trainer.batch_size=4"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        report = run(compose(config_name="draft_train", overrides=overrides), tmp_path / "run")
    unanswered = sum(c[0]["content"] == "count from 0" for c in tiny_conversations(12))
    assert unanswered > 0 and report["data"]["distilled_without_reply"] == unanswered
    assert report["data"]["conversations"] == 12 - unanswered
    assert f"{unanswered} without a reply from the target" in render(report)


def test_self_distillation_cache_keeps_replies_with_unicode_line_separators(tmp_path, tok):
    """Generated text may hold U+2028 / U+2029 / U+0085, which json.dumps(ensure_ascii=False)
    writes raw: the cache must be read line by line on "\n" only."""
    from plmtool.draft.data import self_distill

    convs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\u2028b\u2029c\x85d\x1ce"}]]
    cache = tmp_path / "distill"
    cache.mkdir()
    (cache / "part-00000.jsonl").write_text(json.dumps(convs[0], ensure_ascii=False) + "\n", encoding="utf-8")
    assert self_distill(None, tok, [convs[0][:1]], cache, batch_size=4) == convs


def test_ddp_under_torchrun_keeps_replicas_in_sync(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]  # the worker is run as the module tests.draft.ddp_worker
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
           "-m", "tests.draft.ddp_worker", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo)
    assert out.returncode == 0, out.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["top1"] == r1["top1"]  # held-out accuracy is all-reduced
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert (tmp_path / "drafter" / "drafter.safetensors").is_file()  # rank 0 wrote the checkpoint
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == [2, 4, 6]  # one writer: no duplicated records
    # trainer.max_time_s under DDP: every rank stops (or goes on) with rank 0
    assert r0["stops"] == r1["stops"] == {"rank0_in_time": (True, 6), "rank0_out_of_time": (False, 1)}


def test_bf16_autocast_training_with_frozen_projection(tmp_path, tok):
    # the CPU smoke path: bf16 autocast, frozen shared projection cast once and reused
    target = build_tiny_llama(len(tok))
    m = _train(tok, target, tmp_path, 6, precision="bf16")
    assert m["precision"] == "bf16" and m["loss"]["last"] < m["loss"]["first"]
    d = build_drafter(DrafterConfig(kind="amphista", num_heads=2, freeze_lm_head=True), target)
    assert not d.lm_head.weight.requires_grad and d.num_parameters(trainable_only=True) < d.num_parameters()
    x = torch.randn(3, 2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = d.project(x)
        with torch.no_grad():
            d.lm_head.weight.mul_(2.0)  # the cached cast must follow the weight
        b = d.project(x)
    assert a.dtype == torch.bfloat16 and torch.allclose(b.float(), 2 * a.float(), rtol=2e-2, atol=1e-2)


@pytest.mark.real_model
def test_smollm2_chat_template_masks_exactly_the_replies():
    from types import SimpleNamespace

    from plmtool.models import load_tokenizer

    tok = load_tokenizer(SimpleNamespace(name_or_path="smollm2-135m"))
    conv = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green, like grass."}]
    ids, mask = tokenize_conversation(tok, conv, 4096)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Blue.<|im_end|>Green, like grass.<|im_end|>"
    assert "system" in tok.decode(ids)  # the template's default system prompt is context, not a label


def sharegpt_json(path, n: int, bad_record: int | None = None):
    """A ShareGPT `.json` of `n` counting conversations (indented like the real file); with
    `bad_record` (1-based), that record misses a comma (a JSON syntax error)."""
    records = []
    for i in range(n):
        turns = [{"from": "human", "value": f"count from {i}"}, {"from": "gpt", "value": " ".join(str(i + j) for j in range(12))}]
        text = json.dumps({"id": f"c{i}", "conversations": turns}, indent=2)
        if i + 1 == bad_record:
            text = text.replace('"human",', '"human"', 1)
        records.append(text)
    path.write_text("[\n" + ",\n".join(records) + "\n]\n", encoding="utf-8")
    return path


def _cli(*argv):
    from plmtool import cli

    try:
        return cli.main(list(argv))
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("case", ["syntax error in record 31 of 50", "an object, not an array"])
def test_a_malformed_sharegpt_json_is_one_line_naming_the_file_before_any_model_loads(tmp_path, monkeypatch, capsys, case):
    import plmtool.models

    loaded = []

    def load_model(*a, **k):
        loaded.append(1)
        raise RuntimeError("the model must not load")

    monkeypatch.setattr(plmtool.models, "load_model", load_model)
    data = tmp_path / "chats.json"
    if case.startswith("syntax"):
        sharegpt_json(data, 50, bad_record=31)
        with pytest.raises(json.JSONDecodeError) as ref:  # the independent reference for the position
            json.loads(data.read_text())
        where = f"line {ref.value.lineno} column {ref.value.colno}"
    else:
        data.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}))
        where = "a JSON array"
    capsys.readouterr()
    assert _cli("draft", "train", f"data.source={data}", "model.device=cpu", f"hydra.run.dir={tmp_path / 'run'}") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and str(data) in err[0] and where in err[0], err
    if case.startswith("syntax"):
        assert "record 31" in err[0]
    assert not loaded


@pytest.mark.parametrize("floor", [0.1, 0.0])  # drafter training decays to 10% of the lr, the experts' adapters to 0
def test_shared_schedule_warms_up_linearly_then_follows_a_cosine_to_its_floor(floor):
    import math

    from plmtool.train_loop import cosine_schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_schedule(opt, warmup=4, total=14, floor=floor)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    for step in range(4, 14):
        assert lrs[step] == pytest.approx(2.0 * (floor + (1 - floor) * (1 + math.cos(math.pi * (step - 4) / 10)) / 2))
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * floor)
