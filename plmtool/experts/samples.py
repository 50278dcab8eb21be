"""Instruction samples: reading, validation, held-out split and shard files.

A sample is a plain dict `{"id": str, "messages": [{"role", "content"}, ...], "task": str | None}`.
Its *prompt* (what is embedded and routed) is the user side of the first exchange, i.e.
instruction + input for instruction data, as in the paper.

Sources:
  * `sharegpt` - the embedded ShareGPT conversations (plmtool.data.chat.load_sharegpt);
  * a `.jsonl` file with `instruction` / `input` / `output` (+ optional `task` / `source` /
    `category` label, optional `id`) or with `messages` lines;
  * a `.json` file holding a list of such objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from plmtool.errors import PlmtoolError

Sample = dict[str, Any]
LABEL_FIELDS = ("task", "source", "category")
ROLES = {"user", "assistant", "system"}
# ShareGPT-style role names seen in the wild
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}


def prompt_text(sample: Sample) -> str:
    """The text that is embedded and routed: the first user message (instruction + input)."""
    for m in sample["messages"]:
        if m["role"] == "user":
            return m["content"]
    return sample["messages"][0]["content"]


def _messages_from_instruction(obj: dict[str, Any], where: str) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if key not in obj:
            raise PlmtoolError(f"{where}: missing field '{key}' (instruction data needs instruction/output, optional input)")
        if not isinstance(obj[key], str):
            raise PlmtoolError(f"{where}: field '{key}' must be a string")
    inp = obj.get("input") or ""
    if not isinstance(inp, str):
        raise PlmtoolError(f"{where}: field 'input' must be a string")
    user = obj["instruction"] if not inp.strip() else f"{obj['instruction']}\n\n{inp}"
    if not user.strip() or not obj["output"].strip():
        raise PlmtoolError(f"{where}: empty instruction or output")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]


def _messages_from_chat(msgs: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise PlmtoolError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise PlmtoolError(f"{where}: message {i} is not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = ROLE_ALIASES.get(str(role).lower(), str(role).lower()) if role is not None else None
        if role not in ROLES or not isinstance(content, str):
            raise PlmtoolError(f"{where}: message {i} needs a role (user/assistant/system) and a string content")
        out.append({"role": role, "content": content})
    return out


def first_exchange(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The first user message and the assistant reply right after it (None if there is none)."""
    for i in range(len(messages) - 1):
        if messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant":
            if messages[i]["content"].strip() and messages[i + 1]["content"].strip():
                return [messages[i], messages[i + 1]]
    return None


def parse_record(obj: Any, where: str, default_id: str) -> Sample:
    if not isinstance(obj, dict):
        raise PlmtoolError(f"{where}: expected a JSON object")
    if "messages" in obj or "conversations" in obj:
        messages = _messages_from_chat(obj.get("messages", obj.get("conversations")), where)
        if not any(m["role"] == "assistant" for m in messages):
            raise PlmtoolError(f"{where}: conversation has no assistant message")
    else:
        messages = _messages_from_instruction(obj, where)
    task = next((str(obj[k]) for k in LABEL_FIELDS if obj.get(k) not in (None, "")), None)
    return {"id": str(obj.get("id", default_id)), "messages": messages, "task": task}


def read_jsonl(path: str | Path) -> list[Sample]:
    path = Path(path)
    samples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PlmtoolError(f"{where}: invalid JSON ({e.msg})") from None
            samples.append(parse_record(obj, where, default_id=f"{path.stem}-{lineno}"))
    return samples


def read_json_list(path: str | Path) -> list[Sample]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PlmtoolError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise PlmtoolError(f"{path}: expected a JSON list of samples")
    return [parse_record(obj, f"{path}: item {i}", default_id=f"{path.stem}-{i}") for i, obj in enumerate(data)]


def load_samples(source: str, limit: int | None = None, turns: str = "first") -> list[Sample]:
    """Read samples from `source` (see module doc); `turns=first` keeps the first exchange only."""
    if turns not in ("first", "all"):
        raise PlmtoolError(f"experts.turns must be 'first' or 'all', got '{turns}'")
    if source == "sharegpt":
        from plmtool.data.chat import load_sharegpt

        # read a margin more conversations: some have no usable first exchange
        convs = load_sharegpt(limit=None if limit is None else int(limit * 1.5) + 16, with_ids=True)
        samples = [{"id": f"sharegpt-{i}-{cid}", "messages": c, "task": None} for i, (cid, c) in enumerate(convs)]
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise PlmtoolError(f"instruction data '{source}' not found (use 'sharegpt' or a .jsonl / .json file)")
        samples = read_json_list(path) if path.suffix == ".json" else read_jsonl(path)
    out = []
    for s in samples:
        msgs = first_exchange(s["messages"]) if turns == "first" else s["messages"]
        if msgs is None or not any(m["role"] == "assistant" for m in msgs):
            continue
        out.append({**s, "messages": msgs})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise PlmtoolError(f"no usable samples in '{source}' (need at least one user message with an assistant reply)")
    ids = [s["id"] for s in out]
    if len(set(ids)) != len(ids):
        raise PlmtoolError(f"duplicate sample ids in '{source}'")
    return out


def split_heldout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, heldout) index split; the held-out part never enters clustering or training."""
    import numpy as np

    n_held = int(round(n * fraction))
    perm = np.random.default_rng(seed).permutation(n)
    held = sorted(perm[:n_held].tolist())
    train = sorted(perm[n_held:].tolist())
    return train, held


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
