"""The dispatcher: command listing, unknown commands, one-line user errors."""

from __future__ import annotations

import subprocess
import sys
import time

from plmtool import cli


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plmtool.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands_without_importing_torch():
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from plmtool import cli; cli.main(['--help']); print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0
    assert "eval" in out.stdout
    assert out.stdout.strip().endswith("False")  # torch was not imported


def test_bare_plmtool_is_fast_and_lists_commands():
    start = time.perf_counter()
    out = _run()
    assert out.returncode == 0
    assert "usage: plmtool" in out.stdout and "eval" in out.stdout
    assert time.perf_counter() - start < 10  # generous: a loaded CI box; typical ~0.1 s


def test_unknown_command_exits_nonzero_with_list():
    out = _run("nosuchgroup", "x")
    assert out.returncode != 0
    assert "unknown command 'nosuchgroup x'" in out.stderr
    assert "eval" in out.stderr


def test_resolve_splits_words_from_overrides():
    words, rest = cli.resolve(["eval", "data.seqlen=8", "-m"])
    assert words == ("eval",) and rest == ["data.seqlen=8", "-m"]
    assert cli.resolve(["prune"]) is None


def test_missing_model_path_is_one_clear_line(tmp_path):
    out = _run("eval", "model.name_or_path=/nonexistent", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("plmtool: error: model '/nonexistent' not found")
    assert sum("error" in ln for ln in lines) == 1


def test_wrong_type_fails_at_compose_time(tmp_path):
    out = _run("eval", "data.seqlen=abc", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert "data.seqlen" in out.stderr and "Traceback" not in out.stderr
    out = _run("eval", "nosuchkey=1", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0 and "nosuchkey" in out.stderr


def test_cfg_job_prints_composed_config():
    out = _run("eval", "--cfg", "job", "experiment=smoke")
    assert out.returncode == 0
    assert "name_or_path: smollm2-135m" in out.stdout
    assert "seqlen: 512" in out.stdout


def test_semi_structured_eval_needs_cuda_and_says_so_before_loading(tmp_path):
    out = _run("eval", "semi_structured=true", "model.name_or_path=/nonexistent", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    # checked before the (missing) model is looked up
    assert lines[-1] == "plmtool: error: semi_structured=true needs a CUDA GPU (2:4 sparse tensor cores, Ampere or newer)"
