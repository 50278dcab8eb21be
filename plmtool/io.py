"""Atomic file writes, stage markers and checks of output locations, so an interrupted run never
leaves half a file and a run that cannot write its outputs says so before the long work."""

from __future__ import annotations

import errno
import gzip
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from plmtool.errors import PlmtoolError


def _new_temp_file(directory: Path, name: str) -> tuple[str, int]:
    """An empty, new file beside the target and its permission bits. Created with mode 0o666 so
    that the umask decides them, as for any file the user writes (tempfile.mkstemp makes 0600)."""
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        return str(tmp), mode
    raise FileExistsError(f"no free temporary name for {directory / name}")


def follow_umask(directory: str | Path) -> None:
    """Give every file under `directory` the permissions the umask gives a new file. For savers that
    write through temporary files of their own: safetensors (under save_pretrained) leaves 0600."""
    directory = Path(directory)
    probe, mode = _new_temp_file(directory, "mode")
    os.unlink(probe)
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp_path over `path` (same directory, same filesystem).

    Failing to write (disk full, read-only location) raises an OSError that names `path`, not the
    temporary file, also when the writer reports a full disk in its own exception type (safetensors,
    torch.save).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, mode = _new_temp_file(path.parent, path.name)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        write(tmp)
        os.chmod(tmp, mode)  # writers that replace the file with their own (safetensors) make it 0600
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and not isinstance(e, OSError) and disk_full(path.parent)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise OSError(e.errno, e.strerror, str(path)) from e
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    return path


# errors of writing a file that the user can fix: space, quota, permissions, a file in the way
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST})


def disk_full(directory: str | Path) -> bool:
    """Less than 1 MiB left: a write that failed with this little space behind ran out of it."""
    try:
        return shutil.disk_usage(directory).free < 2**20
    except OSError:
        return False


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


def check_writable_dir(path: str | Path, key: str) -> None:
    """`path` (config key `key`) is a directory this process can create or write into."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise PlmtoolError(f"{key}={path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PlmtoolError(f"{key}={path}: {existing} is not writable")


def check_free_space(directory: str | Path, needed_bytes: int, what: str) -> None:
    """Fail before the long work when `directory`'s file system cannot hold `needed_bytes` more."""
    path = Path(directory).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise PlmtoolError(
            f"{path}: {free / 2**30:.2f} GiB free, but {what} needs {needed_bytes / 2**30:.2f} GiB; free some space or choose another hydra.run.dir"
        )


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


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-empty line; malformed JSON names file:line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PlmtoolError(f"data file {file} not found")
    opener = gzip.open if file.suffix == ".gz" else open  # .jsonl.gz read as it is
    with opener(file, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise PlmtoolError(f"{file}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
