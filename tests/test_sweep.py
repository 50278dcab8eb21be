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
        assert run["status"] == "completed"
    # submitit ran each job in its own process and left its logs
    assert list(sweep.rglob("*_log.out"))
