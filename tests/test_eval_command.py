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
