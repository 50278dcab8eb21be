"""Chat data for `draft train` and `experts`: one reader for every chat format, one set of rules.

Sources (`load_chat`):
  * `commonsense`: the train splits of nine commonsense tasks as instruction records tagged with
    their task (plmtool.data.commonsense);
  * `sharegpt`: the embedded ShareGPT V3 file, a JSON array whose last record is cut off (the
    file in the wheel is truncated): that record alone is passed over, and counted;
  * a `.json` file holding a JSON array of records;
  * any other path: JSONL, one record per line.

A record is one JSON object of one of three shapes, with an optional `id` and an optional task
label (`task`, `source` or `category`, used by experts):
  * ShareGPT: {"conversations": [{"from": "human" | "gpt" | ..., "value": str}, ...]}
  * chat: {"messages": [{"role": "user" | "assistant" | "system", "content": str}, ...]}
    (either list may use either key pair and the role aliases of ROLES; older ShareGPT dumps
    name the list `items`)
  * instruction: {"instruction": str, "input": str (optional), "output": str}

Malformed input is a PlmtoolError naming the file and the place: invalid JSON, a file that is
not a JSON array (`.json`), a record that is not an object, a missing or mistyped field, an
unknown role. A well-formed record that is no usable conversation is skipped and counted by
reason (`SKIP_REASONS`, `ChatData.skipped`), for the command's report: ShareGPT dumps hold many
such records, so they cannot each stop a run.

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}; `load_chat`
returns them as samples (id, messages, task) in a ChatData, with the skipped counts. A sample's id
is the record's `id`, else `<file stem>-<line>` (JSONL) or `<file stem>-<index>` (`.json`).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from plmtool.data.embedded import embedded_file
from plmtool.errors import PlmtoolError
from plmtool.io import iter_jsonl

Message = dict[str, str]
Conversation = list[Message]
Sample = dict[str, Any]  # {"id": str, "messages": Conversation, "task": str | None}

# role names as written in the wild (ShareGPT's human/gpt and the model names of its scrapes)
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "system": "system"}
LABEL_FIELDS = ("task", "source", "category")
# why a well-formed record is skipped; each phrase follows a count in the report
SKIP_REASONS = {
    "system_not_first": "with a system message after the first turn",
    "not_alternating": "with two turns of one role in a row",
    "no_exchange": "without a user turn answered by the assistant",
    "empty_turn": "with an empty turn",
    "truncated": "cut off at the end of the embedded ShareGPT file",
}


class BadRecord(ValueError):
    """A record that is not of any chat shape; the loader adds the file and place."""


@dataclass
class ChatData:
    """The usable conversations of a source and what was passed over to get them."""

    source: str
    samples: list[Sample]
    skipped: dict[str, int] = field(default_factory=dict)  # reason (SKIP_REASONS) -> records

    @property
    def conversations(self) -> list[Conversation]:
        return [s["messages"] for s in self.samples]

    def summary(self) -> dict[str, Any]:
        """What a command's report says of its data."""
        return {"source": self.source, "conversations": len(self.samples), "skipped": dict(self.skipped)}


def skipped_line(skipped: dict[str, int]) -> str:
    """`skipped` in words for a report ('' when nothing was skipped)."""
    if not any(skipped.values()):
        return ""
    parts = ", ".join(f"{n} {SKIP_REASONS.get(reason, reason)}" for reason, n in sorted(skipped.items()) if n)
    return f"skipped {sum(skipped.values())} records: {parts}"


# ----------------------------------------------------------------------------- one record


def _message(turn: Any, i: int) -> Message:
    if not isinstance(turn, dict):
        raise BadRecord(f"message {i} is not an object")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    name = ROLES.get(str(role).lower()) if role is not None else None
    if name is None:
        raise BadRecord(f"message {i} has role {role!r}, not one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise BadRecord(f"message {i} needs a string 'content' (or ShareGPT 'value')")
    return {"role": name, "content": content}


def _instruction(obj: dict[str, Any]) -> Conversation:
    for key in ("instruction", "output"):
        if key not in obj:
            raise BadRecord(f"missing field '{key}' (instruction data needs instruction/output, optional input)")
        if not isinstance(obj[key], str):
            raise BadRecord(f"field '{key}' must be a string")
    extra = obj.get("input") or ""
    if not isinstance(extra, str):
        raise BadRecord("field 'input' must be a string")
    prompt = obj["instruction"] if not extra.strip() else f"{obj['instruction']}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]


def record_messages(obj: Any) -> Conversation:
    """The messages of one record as written (BadRecord when it is of no chat shape)."""
    if not isinstance(obj, dict):
        raise BadRecord("expected a JSON object")
    for key in ("messages", "conversations", "items"):  # "items": an older ShareGPT layout
        if key in obj:
            if not isinstance(obj[key], list):
                raise BadRecord(f"'{key}' must be a list of messages")
            return [_message(t, i) for i, t in enumerate(obj[key])]
    if "instruction" in obj or "output" in obj:
        return _instruction(obj)
    raise BadRecord("expected 'messages', 'conversations' or 'instruction'/'output' fields")


def training_conversation(messages: Conversation) -> tuple[Conversation | None, str | None]:
    """(the conversation trained on, None) or (None, why it is skipped: a key of SKIP_REASONS).

    A system message may only come first; user and assistant turns alternate. The "_split"
    ShareGPT release cuts long chats into chunks: a chunk may start with the assistant's reply to
    a question in the previous chunk, or end on an unanswered user turn; those edges are trimmed
    (as FastChat's preprocessing does) rather than the chunk dropped. What remains must hold at
    least one exchange and no empty turn.
    """
    for i, m in enumerate(messages):
        if m["role"] == "system":
            if i:
                return None, "system_not_first"
        elif i and messages[i - 1]["role"] == m["role"]:
            return None, "not_alternating"
    system = [m for m in messages if m["role"] == "system"]
    body = [m for m in messages if m["role"] != "system"]
    if body and body[0]["role"] == "assistant":
        body = body[1:]
    if body and body[-1]["role"] == "user":
        body = body[:-1]
    if len(body) < 2:
        return None, "no_exchange"
    if any(not m["content"].strip() for m in body):
        return None, "empty_turn"
    return system + body, None


def first_exchange(messages: Conversation) -> Conversation:
    """The first user turn and the reply to it (of a conversation from training_conversation)."""
    body = [m for m in messages if m["role"] != "system"]
    return body[:2]


def task_label(obj: dict[str, Any]) -> str | None:
    return next((str(obj[k]) for k in LABEL_FIELDS if obj.get(k) not in (None, "")), None)


# ----------------------------------------------------------------------------- files


def _line_col(text: str, pos: int) -> str:
    return f"line {text.count(chr(10), 0, pos) + 1} column {pos - text.rfind(chr(10), 0, pos)}"


def _cut_off(text: str, err: json.JSONDecodeError) -> bool:
    """Whether a decode error is the text ending inside a value (a truncated file)."""
    return err.msg.startswith("Unterminated string") or err.pos >= len(text.rstrip())


def iter_json_array(text: str, file: str | Path, truncated_tail: bool = False) -> Iterator[tuple[int, str, Any]]:
    """(index, place, element) for each element of the JSON array in `text`; `place` names `file`,
    the record and its line.

    Malformed JSON is a PlmtoolError naming `file`, the line and column and the record. With
    `truncated_tail` (the embedded ShareGPT file only), text that ends inside an element ends the
    array there: that element comes as `...` (Ellipsis), for the caller to count.
    """
    decoder = json.JSONDecoder()
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def error(pos: int, what: str) -> PlmtoolError:
        return PlmtoolError(f"{file}: {_line_col(text, pos)}{what}")

    seen = [0, 1]  # (position, its line): lines are counted once, as the reading moves on

    def line_at(pos: int) -> int:
        seen[1] += text.count("\n", seen[0], pos)
        seen[0] = pos
        return seen[1]

    i = skip(0)
    if i >= n or text[i] != "[":
        found = "nothing" if i >= n else "an object" if text[i] == "{" else f"'{text[i]}'"
        raise error(i, f": expected a JSON array of conversations, found {found}")
    i = skip(i + 1)
    index = 0
    while not (index == 0 and i < n and text[i] == "]"):  # an empty array has no element to read
        place = f"{file}: record {index + 1} (line {line_at(i)})"
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            if truncated_tail and _cut_off(text, e):
                yield index, place, ...
                return
            raise error(e.pos, f" (record {index + 1}): malformed JSON ({e.msg})") from None
        yield index, place, obj
        index += 1
        i = skip(i)
        if i < n and text[i] == ",":
            i = skip(i + 1)
        elif i < n and text[i] == "]":
            break
        elif i >= n and truncated_tail:
            return
        else:
            found = "the end of the file" if i >= n else f"'{text[i]}'"
            raise error(i, f" (after record {index}): malformed JSON (expected ',' or ']', found {found})")
    i = skip(i + 1)
    if i < n:
        raise error(i, ": malformed JSON (text after the array's closing ']')")


def _records(source: str) -> tuple[Iterator[tuple[str, str, Any]], bool]:
    """(default id, place, record) of each record of a source, and whether it is the embedded file."""
    if source == "commonsense":
        from plmtool.data.commonsense import pool_records

        return ((r["id"], f"commonsense:{r['id']}", r) for r in pool_records()), False
    if source == "sharegpt":
        file = embedded_file("sharegpt")
        text = file.read_text(encoding="utf-8")
        return ((str(i), place, r) for i, place, r in iter_json_array(text, file, truncated_tail=True)), True
    file = Path(source).expanduser()
    if not file.is_file():
        raise PlmtoolError(f"chat data file {file} not found (give 'sharegpt', a .json array or a .jsonl file)")
    if file.suffix == ".json":
        text = file.read_text(encoding="utf-8")
        return ((f"{file.stem}-{i}", place, r) for i, place, r in iter_json_array(text, file)), False
    return ((f"{file.stem}-{n}", f"{file}:{n}", r) for n, r in iter_jsonl(file)), False


def load_chat(source: str, limit: int | None = None) -> ChatData:
    """The first `limit` usable conversations of `source` (see the module doc) with their ids and
    task labels, and the count of records skipped on the way.

    A user's file is checked whole, also past the limit, so that a mistake anywhere in it stops
    the run before any model is loaded; the embedded file is read only as far as needed.
    """
    records, embedded = _records(source)
    samples: list[Sample] = []
    skipped: Counter[str] = Counter()
    for default_id, place, obj in records:
        full = limit is not None and len(samples) >= limit
        if full and embedded:
            break
        if obj is ...:
            skipped["truncated"] += 1
            continue
        try:
            messages = record_messages(obj)
        except BadRecord as e:
            raise PlmtoolError(f"{place}: {e}") from None
        if full:
            continue  # checked only: the data set is complete
        conv, why = training_conversation(messages)
        if conv is None:
            skipped[why] += 1
            continue
        # the embedded file's ids repeat across the chunks of a chat: there they carry the position
        sid = f"sharegpt-{len(samples)}-{obj.get('id', len(samples))}" if embedded else str(obj.get("id", default_id))
        samples.append({"id": sid, "messages": conv, "task": task_label(obj)})
    if not samples:
        what = embedded_file("sharegpt") if embedded else Path(source).expanduser()
        raise PlmtoolError(f"{what}: no usable conversations (a user turn answered by an assistant turn)"
                           + (f"; {skipped_line(skipped)}" if skipped else ""))
    return ChatData(source, samples, dict(skipped))


def split_heldout(n: int, heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) indices into n items, each list in the items' order: `heldout` of
    them drawn by a seeded permutation, at least one left to train on."""
    import numpy as np

    n_held = min(max(0, int(heldout)), max(0, n - 1))
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_held:].tolist()), sorted(perm[:n_held].tolist())


def load_mtbench(path: str | None = None) -> list[dict[str, Any]]:
    """MT-Bench / Spec-Bench questions: {"question_id", "category", "turns": [str, ...]}."""
    file = Path(path).expanduser() if path else embedded_file("mtbench")
    questions = []
    for lineno, obj in iter_jsonl(file):
        if not isinstance(obj, dict) or not isinstance(obj.get("turns"), list) or not obj["turns"]:
            raise PlmtoolError(f"{file}:{lineno}: expected an object with a non-empty 'turns' list")
        questions.append({"question_id": obj.get("question_id", lineno), "category": obj.get("category", "unknown"), "turns": [str(t) for t in obj["turns"]]})
    return questions
