"""The task wrapper every command runs through.

It records `run.json` (command, overrides, status, start/end, versions, git sha) before and after
the work, writes `report.json` + `report.md` atomically, prints the report with rich, and turns a
user's error (`PlmtoolError`, a full disk, an unwritable path) into one clear line on stderr and a
non-zero exit instead of a traceback; Ctrl-C into one line and exit status 130. In a `-m` sweep a
failed job is recorded and the sweep goes on; `RunCallback` (a Hydra callback every launcher config
installs) checks the output directory before Hydra creates it and ends a sweep with a summary of its
jobs and a non-zero exit when one failed.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from plmtool.config import check_known_keys
from plmtool.errors import PlmtoolError
from plmtool.markdown import md_table
from plmtool.io import WRITE_ERRNOS, check_writable_dir, disk_full, read_json, write_json, write_text

log = logging.getLogger("plmtool")

Report = dict[str, Any]
INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for pkg in ("plmtool", "torch", "transformers", "lm_eval", "hydra-core", "peft"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import torch

        found["cuda"] = torch.version.cuda or "none"
        if torch.cuda.is_available():
            found["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return found


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def user_error(e: BaseException, out: Path) -> str | None:
    """The one line for an error the user can fix; None for a bug (which keeps its traceback)."""
    if isinstance(e, PlmtoolError):
        return str(e)
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS and e.filename:
        return f"{e.filename}: {e.strerror}"
    if isinstance(e, Exception) and disk_full(out):
        # writers that report a full disk in their own exception type (safetensors, torch.save)
        first = str(e).splitlines()[0] if str(e) else ""
        return f"{out}: {os.strerror(errno.ENOSPC)} ({type(e).__name__}: {first})"
    return None


def execute(
    cfg: DictConfig,
    work: Callable[[DictConfig, Path], Report],
    render: Callable[[Report], str] | None = None,
) -> Report | None:
    """Run `work(cfg, run_dir)` and write run.json / report.json / report.md into the run dir.

    Returns None for a failed job of a sweep (recorded in its run.json; the sweep goes on).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    logging.getLogger("plmtool").setLevel(logging.INFO)
    record: dict[str, Any] = {
        "command": hc.job.name,
        "argv": sys.argv,
        "overrides": list(hc.overrides.task),
        "status": "running",
        "start": _now(),
        "end": None,
        "host": platform.node(),
        "versions": versions(),
        "git_sha": _git_sha(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    start = time.perf_counter()
    try:
        previous = out / "run.json"
        if previous.is_file():
            record["previous_status"] = read_json(previous).get("status")
        write_json(out / "run.json", record)
        check_known_keys(cfg)  # a misspelt `+key=value` fails here, before any model loads
        report = work(cfg, out)
        report.setdefault("run_dir", str(out))
        write_json(out / "report.json", report)
        markdown = (render or render_generic)(report)
        write_text(out / "report.md", markdown)
        _finish(out, record, "finished", start)
    except KeyboardInterrupt:
        _finish(out, record, "interrupted", start)
        print(f"plmtool: interrupted; {out / 'run.json'} records status interrupted", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)
    except BaseException as e:
        message = user_error(e, out)
        _finish(out, record, "failed", start, error=message or f"{type(e).__name__}: {e}")
        if message:
            print(f"plmtool: error: {message}", file=sys.stderr, flush=True)
        if sweep and isinstance(e, Exception):
            if not message:
                log.exception("job %s failed", out)
            return None  # the other jobs run; RunCallback sums up
        if message:
            sys.exit(2)
        raise
    print_markdown(markdown)
    # last lines: where everything went (every command, every run)
    print(f"run directory: {out}\nreport: {out / 'report.md'}", flush=True)
    return report


def _finish(out: Path, record: dict[str, Any], status: str, start: float, error: str | None = None) -> None:
    record.update(status=status, end=_now(), seconds=round(time.perf_counter() - start, 2))
    if error:
        record["error"] = error
    try:
        write_json(out / "run.json", record)
    except OSError:
        if status == "finished":
            raise
        # the run is ending on an error already being reported (often this same full disk)


class RunCallback(Callback):
    """Checks before Hydra creates the output directory; a summary at the end of a sweep.

    Installed by every launcher config (`hydra.callbacks.plmtool`). Hydra swallows Exceptions raised
    by callbacks, so errors leave with SystemExit.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_output_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_output_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
        self.before = {path: r.get("start") for path, r in _job_records(Path(config.hydra.sweep.dir)).items()}

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = {path: r for path, r in _job_records(sweep_dir).items() if self.before.get(path) != r.get("start")}
        if not jobs:
            return
        failed = {path: r for path, r in jobs.items() if r.get("status") != "finished"}
        lines = [f"sweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} jobs finished, {len(failed)} failed"]
        for path, r in sorted(jobs.items(), key=lambda kv: _job_order(kv[0])):
            error = f"  {r['error']}" if r.get("error") else ""
            lines.append(f"  {r.get('status', 'unknown'):<11} {path.parent}{error}")
        print("\n".join(lines), flush=True)
        if failed:
            print(f"plmtool: error: {len(failed)} of {len(jobs)} sweep jobs failed", file=sys.stderr, flush=True)
            sys.exit(1)


def _check_output_dir(path: str, key: str) -> None:
    try:
        check_writable_dir(path, key)
    except PlmtoolError as e:
        print(f"plmtool: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _job_records(sweep_dir: Path) -> dict[Path, dict[str, Any]]:
    """run.json of every job under the sweep directory (by path), `start` telling runs apart."""
    found = {}
    for path in sweep_dir.rglob("run.json") if sweep_dir.is_dir() else []:
        try:
            found[path] = read_json(path)
        except (OSError, ValueError):
            continue
    return found


def _job_order(path: Path) -> tuple:
    # job subdirectories are numbered (hydra.job.num): 0, 1, ..., 10 in numeric order
    return tuple(int(p) if p.isdigit() else 0 for p in path.parent.parts), str(path)


def print_markdown(markdown: str) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(markdown))


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        items: list[tuple[str, Any]] = []
        for k, v in obj.items():
            items += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return items
    if isinstance(obj, list) and len(obj) > 8:
        return [(prefix, f"[{len(obj)} items]")]
    return [(prefix, obj)]


def render_generic(report: Report) -> str:
    return "# plmtool report\n\n" + md_table(["key", "value"], [list(kv) for kv in _flatten(report) if kv[0] != "run_dir"]) + "\n"


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
