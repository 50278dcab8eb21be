"""A `-m` sweep through the submitit_local launcher: the code path a Slurm array takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_submitit_local_sweep_writes_one_report_per_job(tmp_path, tiny_llama_dir):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "plmtool.cli", "eval", "-m", "launcher=submitit_local",
        f"model.name_or_path={tiny_llama_dir}", "model.device=cpu", "data.corpus=news_sample",
        "eval.seqlen=32,64", "eval.max_tokens=512", "eval.zeroshot=[]",
        f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PLMTOOL_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    reports = sorted(sweep.glob("*/report.json"))
    assert len(reports) == 2, list(sweep.rglob("*"))
    seqlens = sorted(json.loads(r.read_text())["seqlen"] for r in reports)
    assert seqlens == [32, 64]
    for r in reports:
        report = json.loads(r.read_text())
        assert report["ppl"] > 1 and report["corpus"] == "news_sample"
        run = json.loads((r.parent / "run.json").read_text())
        assert run["status"] == "finished"
    # submitit ran each job in its own process and left its logs
    assert list(sweep.rglob("*_log.out"))


def test_a_failed_job_does_not_stop_the_sweep(tmp_path, tiny_llama_dir):
    """Job 0 fails on bad input (one line); job 1 still runs; a summary names both; non-zero exit."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "plmtool.cli", "eval", "-m", "experiment=smoke", "eval.seqlen=0,32",
        f"model.name_or_path={tiny_llama_dir}", "model.device=cpu", "eval.max_tokens=256", "eval.zeroshot=[]",
        f"hydra.sweep.dir={sweep}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PLMTOOL_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert json.loads((sweep / "0" / "run.json").read_text())["status"] == "failed"
    assert not (sweep / "0" / "report.json").exists()
    report = json.loads((sweep / "1" / "report.json").read_text())
    assert report["seqlen"] == 32 and report["ppl"] > 1
    assert json.loads((sweep / "1" / "run.json").read_text())["status"] == "finished"
    summary = out.stdout[out.stdout.index(f"sweep {sweep}:"):].splitlines()
    assert summary[0] == f"sweep {sweep}: 1 of 2 jobs finished, 1 failed"
    assert summary[1].split() == ["failed", str(sweep / "0"), *"eval.seqlen must be at least 2 (got 0)".split()]
    assert summary[2].split() == ["finished", str(sweep / "1")]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("plmtool: error:")]
    assert errors == ["plmtool: error: eval.seqlen must be at least 2 (got 0)", "plmtool: error: 1 of 2 sweep jobs failed"]
