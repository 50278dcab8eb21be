"""The task wrapper and atomic writes: Ctrl-C, a full disk and file permissions end as the user expects."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import namedtuple

import pytest

from plmtool import io
from plmtool.errors import PlmtoolError


def _run_work(tmp_path, body: str) -> subprocess.CompletedProcess:
    """A Hydra app on the eval config whose work function is `body`, run through runner.execute."""
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import errno, os, signal, time
        import hydra
        import plmtool.config
        from plmtool.io import atomic_write
        from plmtool.paths import CONF_DIR
        from plmtool.runner import execute

        def work(cfg, out):
        {body}

        @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
        def main(cfg):
            execute(cfg, work)

        main()
    """).format(body=textwrap.indent(textwrap.dedent(body), "    ")))
    return subprocess.run([sys.executable, str(script), f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)


def test_ctrl_c_is_one_line_exit_130_and_recorded(tmp_path):
    out = _run_work(tmp_path, """
        # Python's own handler, as in a terminal (a job started in the background inherits SIGINT ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        time.sleep(60)
    """)
    assert out.returncode == 130
    run = tmp_path / "run" / "run.json"
    assert out.stderr.strip().splitlines() == [f"plmtool: interrupted; {run} records status interrupted"]
    assert json.loads(run.read_text())["status"] == "interrupted"


def test_a_full_disk_while_writing_is_one_line_naming_the_file(tmp_path):
    out = _run_work(tmp_path, """
        def write(tmp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
        atomic_write(out / "weights" / "sds.safetensors", write)
    """)
    assert out.returncode == 2
    target = tmp_path / "run" / "weights" / "sds.safetensors"
    assert out.stderr.strip().splitlines() == [f"plmtool: error: {target}: No space left on device"]
    assert os.listdir(target.parent) == []  # no temporary file left behind
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == f"{target}: No space left on device"


def test_a_writer_that_hides_a_full_disk_in_its_own_exception_names_the_file(tmp_path, monkeypatch):
    class SafetensorError(Exception):  # safetensors' Rust error type is not an OSError
        pass

    def write(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 4096, 4096))
    with pytest.raises(OSError) as e:
        io.atomic_write(tmp_path / "w.safetensors", write)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "w.safetensors")
    # with space left, the writer's own error is what it is
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**39, 2**39))
    with pytest.raises(SafetensorError):
        io.atomic_write(tmp_path / "w.safetensors", write)


def test_free_space_check(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    io.check_free_space(tmp_path / "not" / "yet", 1, "the model")
    with pytest.raises(PlmtoolError, match=rf"^{tmp_path / 'run'}: .* GiB free, but the model needs .* GiB"):
        io.check_free_space(tmp_path / "run", free + 2**40, "the model")


def test_atomic_writes_follow_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        io.atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, tmp))
        io.write_json(tmp_path / "a" / "report.json", {})
        os.umask(0o077)
        io.write_text(tmp_path / "private.md", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a" / "report.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.md").stat().st_mode & 0o777 == 0o600


def test_saved_checkpoints_follow_the_umask(tmp_path, tiny_llama, tiny_tokenizer):
    old = os.umask(0o022)
    try:
        tiny_llama.save_pretrained(tmp_path)  # safetensors writes model.safetensors 0600
        tiny_tokenizer.save_pretrained(tmp_path)
        io.follow_umask(tmp_path)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}
