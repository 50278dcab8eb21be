"""Every primary config composes with every option of every group it uses; schemas reject bad input."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from plmtool import cli
from plmtool.config import check_known_keys
from plmtool.errors import PlmtoolError
from plmtool.paths import CONF_DIR

CONF = Path(CONF_DIR)
SHARED_GROUPS = ("model", "data", "eval", "trainer", "launcher")


def primaries() -> list[str]:
    """Primary configs of the commands that exist (importing the module registers its schema)."""
    names = []
    for _, (module, _) in cli.available().items():
        importlib.import_module(module)
        names.append(module.rsplit(".", 1)[1])
    return names


def groups_of(primary: str) -> list[str]:
    defaults = yaml.safe_load((CONF / f"{primary}.yaml").read_text())["defaults"]
    groups = []
    for entry in defaults:
        if isinstance(entry, dict):
            key = next(iter(entry))
            if not key.startswith(("optional", "override")) and (CONF / key).is_dir():
                groups.append(key)
    return groups


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def cases():
    for primary in primaries():
        for group in groups_of(primary):
            for option in options(group):
                yield pytest.param(primary, group, option, id=f"{primary}:{group}={option}")


def test_every_primary_uses_the_shared_groups_it_needs():
    assert "eval" in primaries()
    assert {"model", "data", "eval", "launcher", "experiment"} <= set(groups_of("eval"))


@pytest.mark.parametrize("primary,group,option", list(cases()))
def test_compose(primary, group, option):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=primary, overrides=[f"{group}={option}"], return_hydra_config=True)
    assert cfg.model.name_or_path
    check_known_keys(cfg)  # every shipped option holds only keys of the command's schema


@pytest.mark.parametrize("primary", primaries())
def test_added_keys_the_schema_lacks_are_rejected(primary):
    """`+key=value` passes composition (Hydra opens the config for it); the schema check names it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        typo = compose(config_name=primary, overrides=["+model.name_or_paht=x"])
        nested = compose(config_name=primary, overrides=["+nosuch.group.key=1"])
    with pytest.raises(PlmtoolError, match=r"^unknown config key 'model.name_or_paht'; did you mean model.name_or_path\?$"):
        check_known_keys(typo)
    with pytest.raises(PlmtoolError, match=r"^unknown config key 'nosuch'$"):
        check_known_keys(nested)


def test_every_command_has_a_smoke_preset():
    for primary in primaries():
        assert (CONF / "experiment" / primary / "smoke.yaml").is_file(), primary


def test_wrong_type_and_unknown_key_fail_at_compose_time():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        with pytest.raises((ValidationError, ConfigCompositionException)):
            compose(config_name="eval", overrides=["data.seqlen=abc"])
        with pytest.raises((ConfigKeyError, ConfigCompositionException)):
            compose(config_name="eval", overrides=["model.nosuchkey=1"])


def test_slurm_launcher_has_the_cluster_knobs():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "submitit_slurm" in launcher._target_.lower() or "slurm" in launcher._target_.lower()
    for knob in ("partition", "gpus_per_node", "timeout_min", "mem_gb", "cpus_per_task"):
        assert knob in launcher
