"""Where configs and caches live. Imports nothing heavy: the CLI uses it before torch loads."""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _conf_dir() -> Path:
    # In a source checkout conf/ sits next to the package; a wheel ships it as plmtool/conf.
    repo_conf = _PKG.parent / "conf"
    if (repo_conf / "eval.yaml").is_file():
        return repo_conf
    return _PKG / "conf"


CONF_DIR = str(_conf_dir())


def cache_dir(override: str | None = None) -> Path:
    """Cache for converted models, cleaned corpora and generated tasks.

    Order: explicit override, $PLMTOOL_CACHE, $XDG_CACHE_HOME/plmtool, ~/.cache/plmtool.
    """
    if override:
        path = Path(override).expanduser()
    elif os.environ.get("PLMTOOL_CACHE"):
        path = Path(os.environ["PLMTOOL_CACHE"]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "plmtool"
    path.mkdir(parents=True, exist_ok=True)
    return path
