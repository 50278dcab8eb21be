"""The task wrapper every command runs through.

It records `run.json` (command, overrides, status, start/end, versions, git sha) before and after
the work, writes `report.json` + `report.md` atomically, prints the report with rich, and turns a
`PlmtoolError` into one clear line on stderr and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from plmtool.errors import PlmtoolError
from plmtool.io import read_json, write_json, write_text

log = logging.getLogger("plmtool")

Report = dict[str, Any]


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


def execute(
    cfg: DictConfig,
    work: Callable[[DictConfig, Path], Report],
    render: Callable[[Report], str] | None = None,
) -> Report | None:
    """Run `work(cfg, run_dir)` and write run.json / report.json / report.md into the run dir."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
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
    previous = out / "run.json"
    if previous.is_file():
        record["previous_status"] = read_json(previous).get("status")
    write_json(out / "run.json", record)
    start = time.perf_counter()
    try:
        report = work(cfg, out)
    except PlmtoolError as e:
        _finish(out, record, "failed", start, error=str(e))
        print(f"plmtool: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _finish(out, record, "interrupted", start)
        raise
    except BaseException as e:
        _finish(out, record, "failed", start, error=f"{type(e).__name__}: {e}")
        raise
    report.setdefault("run_dir", str(out))
    write_json(out / "report.json", report)
    markdown = (render or render_generic)(report)
    write_text(out / "report.md", markdown)
    _finish(out, record, "completed", start)
    print_markdown(markdown)
    # last lines: where everything went (every command, every run)
    print(f"run directory: {out}\nreport: {out / 'report.md'}", flush=True)
    return report


def _finish(out: Path, record: dict[str, Any], status: str, start: float, error: str | None = None) -> None:
    record.update(status=status, end=_now(), seconds=round(time.perf_counter() - start, 2))
    if error:
        record["error"] = error
    write_json(out / "run.json", record)


def print_markdown(markdown: str) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(markdown))


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


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
