"""A non-editable install must carry every subpackage and the configs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "plmtool").rglob("__init__.py")}
    assert found <= listed, f"missing from pyproject packages: {sorted(found - listed)}"


def test_wheel_ships_configs_and_runs_from_outside_the_checkout(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("plmtool-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "plmtool/conf/eval.yaml" in names
    assert "plmtool/conf/experiment/eval/smoke.yaml" in names
    assert "plmtool/conf/model/smollm2-135m.yaml" in names
    # Unpacked alone (no checkout beside it), the config dir resolves inside the package.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = subprocess.run(
        [sys.executable, "-c", "from plmtool.paths import CONF_DIR; print(CONF_DIR)"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == str(site / "plmtool" / "conf")
    show = subprocess.run(
        [sys.executable, "-m", "plmtool.cli", "eval", "--cfg", "job", "experiment=smoke"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120,
    )
    assert show.returncode == 0, show.stderr
    assert "seqlen: 512" in show.stdout
