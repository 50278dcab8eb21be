"""`plmtool eval` end to end on the embedded model with the offline standard tasks (the contract)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from plmtool.eval.zeroshot import PRESETS


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plmtool.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.real_model
def test_eval_smoke_wanda7_offline_writes_every_task(tmp_path):
    out = _run("eval", "experiment=smoke", "eval=wanda7", "eval.zeroshot_limit=20", "eval.max_tokens=2048",
               f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for task in PRESETS["wanda7"]:
        assert 0.0 <= report["zeroshot"][task] <= 1.0, task
        detail = report["zeroshot_tasks"][task]
        assert detail["n"] == 20 and detail["source"] == "local" and detail["total_docs"] > 20
    assert report["zeroshot_avg"] == pytest.approx(sum(report["zeroshot"].values()) / 7)
    assert report["zeroshot_unavailable"] == {}
    md = (tmp_path / "report.md").read_text()
    assert "first 20 documents per task (subset)" in md and "hellaswag acc_norm" in md
    # the last lines name the run directory and its report
    last = [ln for ln in out.stdout.splitlines() if ln.strip()][-1]
    assert last == f"report: {tmp_path / 'report.md'}"


def test_bad_zeroshot_settings_are_one_line_before_loading(tmp_path):
    for args, needle in [
        (["eval.zeroshot_limit=0"], "eval.zeroshot_limit must be at least 1"),
        (["eval.zeroshot=[no_such_task]"], "unknown zero-shot task 'no_such_task' offline"),
        (["eval.task_source=web"], "eval.task_source=web"),
    ]:
        out = _run("eval", *args, "model.name_or_path=/nonexistent", f"hydra.run.dir={tmp_path}", timeout=120)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        # reported before the model (whose path does not exist) is looked at
        assert lines[-1].startswith("plmtool: error:") and needle in lines[-1], lines[-1]


def _last_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return [ln for ln in out.stderr.splitlines() if ln.strip()][-1]


def test_bad_corpus_and_model_config_are_one_line_before_loading(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un café\n\nau lait".encode("latin-1"))
    # the corpus is checked before the model (whose path does not exist) is looked at
    for corpus, needle in [(tmp_path / "missing.txt", f"no file at {tmp_path / 'missing.txt'}"),
                           (latin1, f"{latin1}:1: not UTF-8 text (byte 0xe9 at offset 6)")]:
        out = _run("eval", f"data.corpus={corpus}", "model.name_or_path=/nonexistent", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
        assert needle in _last_error(out)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    out = _run("eval", f"model.name_or_path={model}", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert _last_error(out) == (f"plmtool: error: {model / 'config.json'} has no 'model_type' (e.g. \"llama\"): "
                                "transformers cannot tell which architecture to load")


def test_outputs_follow_the_umask(tmp_path, tiny_llama_dir):
    import os

    out = subprocess.run(
        [sys.executable, "-m", "plmtool.cli", "eval", f"model.name_or_path={tiny_llama_dir}", "model.device=cpu", "eval.seqlen=32",
         "eval.max_tokens=64", "eval.zeroshot=[]", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o002),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("report.json", "report.md", "run.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o664, name
