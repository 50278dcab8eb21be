"""The dispatcher: command listing, unknown commands, one-line user errors."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import pytest

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


def _examples() -> list[list[str]]:
    """The command lines of usage()'s examples, as argv after `plmtool`."""
    import shlex

    lines = cli.usage().split("examples:", 1)[1].splitlines()
    return [shlex.split(ln.split("#", 1)[0])[1:] for ln in lines if ln.strip()]


def test_every_usage_example_composes_and_its_sweeps_change_what_the_command_reads():
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from plmtool.config import check_known_keys
    from plmtool.paths import CONF_DIR
    from omegaconf import OmegaConf

    examples = _examples()
    assert examples and all(cli.resolve(argv) for argv in examples)
    for argv in examples:
        words, rest = cli.resolve(argv)
        module = cli.COMMANDS[words][0]
        importlib.import_module(module)  # registers the schema
        overrides = [a for a in rest if a not in ("-m", "--multirun", "--cfg", "job")]
        parsed = OverridesParser.create().parse_overrides(overrides)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        sweeps = [o for o in parsed if o.is_sweep_override()]
        assert ("-m" in rest) == bool(sweeps), argv
        variants = [fixed] + [[*fixed, f"{o.get_key_element()}={v}"] for o in sweeps for v in o.sweep_string_iterator()]
        seen = []
        for variant in variants:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose(config_name=module.rsplit(".", 1)[1], overrides=variant)
            check_known_keys(cfg)
            seen.append(OmegaConf.to_container(cfg, resolve=True))
        if words == ("eval",) and sweeps:
            # eval reads its settings from model.* and eval.* (eval.corpus follows data.corpus);
            # data.seqlen / data.nsamples size calibration windows, which eval never draws
            reads = [(v["model"], v["eval"]) for v in seen[1:]]
            assert len({repr(r) for r in reads}) == len(reads), f"{argv}: the sweep does not change what eval reads"


def test_unknown_key_is_one_line_before_the_model_for_every_command(tmp_path):
    for words in cli.available():
        out = _run(*words, "+nosuch.sparsty=0.6", "model.name_or_path=/nonexistent", f"hydra.run.dir={tmp_path / '_'.join(words)}")
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert out.returncode == 2 and "Traceback" not in out.stderr, (words, out.stderr[-2000:])
        # checked before the (missing) model is looked up
        assert lines[-1] == "plmtool: error: unknown config key 'nosuch'", (words, lines[-1])
    out = _run("eval", "+eval.seqln=512", "model.name_or_path=/nonexistent", f"hydra.run.dir={tmp_path / 'typo'}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "plmtool: error: unknown config key 'eval.seqln'; did you mean eval.seqlen?"
    run = json.loads((tmp_path / "typo" / "run.json").read_text())
    assert run["status"] == "failed" and "eval.seqln" in run["error"]


def test_unwritable_run_dir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = _run("eval", f"hydra.run.dir={blocker / 'run'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [f"plmtool: error: hydra.run.dir={blocker / 'run'}: {blocker} is a file, not a directory"]
    out = _run("eval", "-m", f"hydra.sweep.dir={blocker / 'sweep'}", "eval.seqlen=32,64")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("plmtool: error: hydra.sweep.dir=")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_dir_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    out = _run("eval", f"hydra.run.dir={locked / 'run'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [f"plmtool: error: hydra.run.dir={locked / 'run'}: {locked} is not writable"]


def _in_process(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["plmtool"])
    try:
        return cli.main(list(argv))
    except SystemExit as e:
        return int(e.code or 0)


def test_prune_checks_inputs_and_free_space_before_the_long_work(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    fast = ["data.nsamples=4", "data.seqlen=32", "eval.seqlen=32", "eval.max_tokens=256", "eval.zeroshot=[]", "model.device=cpu"]
    # a missing corpus is named before the (missing) model is looked at
    rc = _in_process(monkeypatch, "prune", "sds", *fast, f"data.corpus={tmp_path / 'missing.txt'}", "model.name_or_path=/nonexistent",
                     f"hydra.run.dir={tmp_path / 'corpus'}")
    assert rc == 2 and f"no file at {tmp_path / 'missing.txt'}" in capsys.readouterr().err.strip().splitlines()[-1]
    # the saved model needs more than the disk has: one line, before any stage runs
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 4096, 4096))
    run = tmp_path / "full"
    rc = _in_process(monkeypatch, "prune", "sds", *fast, "prune.save_model=true", f"model.name_or_path={tiny_llama_dir}", f"hydra.run.dir={run}")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"plmtool: error: {run}: 0.00 GiB free, but the pruned model (prune.save_model=true) needs"), err[-1]
    assert not (run / "stages").exists() and not (run / "weights").exists()
