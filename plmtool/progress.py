"""Progress for long loops: a rich bar on a terminal, plain log lines otherwise (Slurm logs)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger("plmtool")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        from rich.progress import track as rich_track

        yield from rich_track(items, description=description, total=total, transient=True)
        return
    # Log roughly every 10% (and at the end) so batch logs stay readable.
    step = max(1, (total or 10) // 10)
    start = time.perf_counter()
    n = 0
    for n, item in enumerate(items, 1):
        yield item
        if n % step == 0 or n == total:
            elapsed = time.perf_counter() - start
            of = f"/{total}" if total else ""
            log.info("%s: %d%s (%.1fs)", description, n, of, elapsed)
