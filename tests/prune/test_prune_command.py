"""`plmtool prune sds` end to end on a tiny model: stages, report keys, checkpoint, resume, errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from plmtool import cli

FAST = [
    "data.nsamples=4", "data.seqlen=32", "eval.seqlen=32", "eval.max_tokens=256", "eval.zeroshot=[]",
    "prune.sds.redense.iterations=5", "prune.sds.adjust.iterations=5", "model.dtype=float32", "model.device=cpu",
]


def _prune(monkeypatch, *overrides: str) -> int:
    monkeypatch.setattr(sys, "argv", ["plmtool"])
    try:
        cli.main(["prune", "sds", *overrides])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


def test_all_stages_report_and_checkpoint(monkeypatch, tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from plmtool.prune.patterns import parse_pattern, verify
    from plmtool.prune.sequential import block_linears, decoder_layers

    rc = _prune(monkeypatch, f"model.name_or_path={tiny_llama_dir}", "prune=sparsegpt", *FAST, f"hydra.run.dir={tmp_path}")
    assert rc == 0
    rep = _report(tmp_path)
    for stage in ("dense", "oneshot", "redense", "sds"):
        assert rep["stages"][stage]["ppl"] > 1
    assert rep["stages"]["dense"]["sparsity"] < 0.01
    assert rep["stages"]["oneshot"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rep["stages"]["sds"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rep["stages"]["redense"]["sparsity"] < 0.2
    assert len(rep["layers"]) == 2 * 7
    assert (tmp_path / "weights_histogram.png").stat().st_size > 1000
    # the saved checkpoint is a plain HF model whose layers are 2:4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for block in decoder_layers(model):
        for name, lin in block_linears(block).items():
            assert verify(lin.weight, parse_pattern("2:4")) is None, name
    assert "Sparsity per layer" in (tmp_path / "report.md").read_text()


def test_resume_skips_finished_stages(monkeypatch, tmp_path, tiny_llama_dir, caplog):
    base = [f"model.name_or_path={tiny_llama_dir}", *FAST, f"hydra.run.dir={tmp_path}"]
    assert _prune(monkeypatch, *base, "prune.stages=[dense,oneshot]") == 0
    first = _report(tmp_path)
    marker = tmp_path / "stages" / "oneshot.json"
    weights = tmp_path / "weights" / "oneshot.safetensors"
    stamp = (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    assert _prune(monkeypatch, *base) == 0
    rep = _report(tmp_path)
    assert (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamp
    assert rep["stages"]["oneshot"]["ppl"] == first["stages"]["oneshot"]["ppl"]
    assert "sds" in rep["stages"] and rep["stages"]["sds"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_oneshot_only_baseline(monkeypatch, tmp_path, tiny_llama_dir):
    assert _prune(monkeypatch, f"model.name_or_path={tiny_llama_dir}", "prune=magnitude", "prune.pattern=4:8",
                  "prune.stages=[oneshot]", *FAST, f"hydra.run.dir={tmp_path}") == 0
    rep = _report(tmp_path)
    assert list(rep["stages"]) == ["oneshot"]
    assert rep["stages"]["oneshot"]["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    "override,message",
    [
        (["prune.pattern=unstructured", "prune.sparsity=1.5"], "prune.sparsity=1.5"),
        (["prune.pattern=unstructured", "prune.sparsity=0"], "prune.sparsity=0"),
        (["prune.pattern=4:4"], "N must be smaller than M"),
        (["prune.pattern=2:5"], "does not divide"),
        (["prune.method=obs"], "unknown method"),
        (["prune.stages=[dense,foo]"], "unknown stage"),
        (["prune.sds.redense.iterations=-1"], "prune.sds.redense.iterations=-1"),
        (["prune.sds.adjust.optimizer=lion"], "prune.sds.adjust.optimizer=lion"),
        (["prune.sds.inputs=both"], "prune.sds.inputs=both"),
    ],
)
def test_bad_input_is_one_clear_error_before_loading(monkeypatch, tmp_path, tiny_llama_dir, capsys, override, message):
    import plmtool.models

    def no_load(*a, **k):
        raise AssertionError("model loaded before validation")

    monkeypatch.setattr(plmtool.models, "load_model", no_load)
    rc = _prune(monkeypatch, f"model.name_or_path={tiny_llama_dir}", *FAST, *override, f"hydra.run.dir={tmp_path}")
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("plmtool: error")]
    assert len(lines) == 1 and message in lines[0], err


def test_every_method_has_its_yaml_and_back():
    from pathlib import Path

    import yaml

    from plmtool.paths import CONF_DIR
    from plmtool.prune.config import METHODS

    files = {p.stem: yaml.safe_load(p.read_text()) for p in (Path(CONF_DIR) / "prune").glob("*.yaml")}
    assert set(files) == set(METHODS)
    assert all(cfg["method"] == name for name, cfg in files.items())


def _composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    import plmtool.prune.schema  # noqa: F401  (registers prune_sds_schema)
    from plmtool.paths import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="prune_sds", overrides=list(overrides))


def test_command_defaults_are_the_math_defaults():
    """What the command hands the math from its default config is the dataclass's own default
    object: one source of every default (30 SDS iterations, adjustment lr 0.05, 8 samples per
    block call), and an override reaches the math."""
    from plmtool.commands.prune_sds import validate
    from plmtool.prune.config import OptimConfig, PruneConfig, SdsConfig

    prune = validate(_composed())
    assert type(prune) is PruneConfig and type(prune.sds) is SdsConfig and type(prune.sds.redense) is OptimConfig
    assert prune == PruneConfig()
    assert (prune.sds.redense.iterations, prune.sds.adjust.iterations, prune.sds.redense.lr, prune.sds.adjust.lr) == (30, 30, 0.01, 0.05)
    assert prune.batch_size == 8 and prune.parsed_pattern.structured and prune.parsed_pattern.m == 4
    changed = validate(_composed("prune.sds.redense.iterations=5", "prune=sparsegpt", "prune.exclude=[mlp]"))
    assert changed == PruneConfig(method="sparsegpt", exclude=["mlp"], sds=SdsConfig(redense=OptimConfig(iterations=5)))


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda c: c.SdsConfig(redense=c.OptimConfig(iterations=-1)), "prune.sds.redense.iterations=-1"),
        (lambda c: c.SdsConfig(adjust=c.OptimConfig(optimizer="lion")), "prune.sds.adjust.optimizer=lion"),
        (lambda c: c.SdsConfig(redense=c.OptimConfig(lr=0.0)), "prune.sds.redense.lr=0.0"),
        (lambda c: c.SdsConfig(l2=-0.1), "prune.sds.l2=-0.1"),
        (lambda c: c.PruneConfig(propagate="x"), "prune.propagate=x"),
        (lambda c: c.PruneConfig(batch_size=0), "prune.batch_size=0"),
        (lambda c: c.PruneConfig(method="wanda", pattern="8:4"), "prune.pattern=8:4"),
    ],
)
def test_bad_settings_fail_where_they_are_built(build, message):
    """Scripts build the dataclasses directly: a bad value fails as it is built, in one line that
    names its config key."""
    import plmtool.prune.config as c
    from plmtool.errors import PlmtoolError

    with pytest.raises(PlmtoolError) as err:
        build(c)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
