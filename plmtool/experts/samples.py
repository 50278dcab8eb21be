"""Instruction samples of the experts: the chat data as redistributed, and its shard files.

A sample is a plain dict `{"id": str, "messages": [{"role", "content"}, ...], "task": str | None}`
(plmtool.data.chat reads every source with one set of rules). Its *prompt* (what is embedded and
routed) is the user side of the first exchange, i.e. instruction + input for instruction data, as
in the paper.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from plmtool.data.chat import ChatData, first_exchange, load_chat
from plmtool.errors import PlmtoolError

Sample = dict[str, Any]
TURNS = ("first", "all")


def prompt_text(sample: Sample) -> str:
    """The text that is embedded and routed: the first user message (instruction + input)."""
    for m in sample["messages"]:
        if m["role"] == "user":
            return m["content"]
    return sample["messages"][0]["content"]


def load_samples(source: str, limit: int | None = None, turns: str = "first") -> ChatData:
    """The usable samples of `source` (plmtool.data.chat.load_chat); `turns=first` keeps the
    first exchange of each conversation only. Sample ids must be unique (they key every file)."""
    if turns not in TURNS:
        raise PlmtoolError(f"experts.turns must be 'first' or 'all', got '{turns}'")
    data = load_chat(source, limit)
    if turns == "first":
        data.samples = [{**s, "messages": first_exchange(s["messages"])} for s in data.samples]
    counts = Counter(s["id"] for s in data.samples)
    dup = next((i for i, n in counts.items() if n > 1), None)
    if dup is not None:
        raise PlmtoolError(f"{source}: sample id '{dup}' is given to more than one record (ids key the redistribution's files)")
    return data


def write_samples(path: str | Path, samples: Iterable[Sample], extra: dict[str, list[Any]] | None = None) -> None:
    """Write samples as JSONL atomically; `extra` adds per-sample fields (e.g. cluster)."""
    from plmtool.io import atomic_write

    samples = list(samples)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for i, s in enumerate(samples):
                row = dict(s)
                for k, values in (extra or {}).items():
                    row[k] = values[i]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(path, write)


def read_samples(path: str | Path) -> list[Sample]:
    """Read a shard written by write_samples (already validated)."""
    path = Path(path)
    if not path.is_file():
        raise PlmtoolError(f"{path} not found")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
