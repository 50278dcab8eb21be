"""Atomic file writes and stage markers, so an interrupted run never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp_path over `path` (same directory, same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and paths show up in reports; make them plain JSON.
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class Stages:
    """Markers under `<run_dir>/stages/<name>.json`: a finished stage is skipped on rerun.

    The marker is written last (atomically), after everything the stage produces, so its presence
    means the stage's outputs are complete.
    """

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "stages"

    def done(self, name: str) -> bool:
        return (self.dir / f"{name}.json").is_file()

    def result(self, name: str) -> Any:
        return read_json(self.dir / f"{name}.json")

    def mark(self, name: str, result: Any = None) -> None:
        write_json(self.dir / f"{name}.json", {} if result is None else result)
