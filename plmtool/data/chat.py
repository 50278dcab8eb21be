"""Chat / instruction data: ShareGPT (embedded or user file), chat JSONL, MT-Bench questions.

Every loader returns conversations as lists of {"role": "system"|"user"|"assistant", "content": str}.
A malformed line is a PlmtoolError naming the file and the line number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from plmtool.data.embedded import embedded_file
from plmtool.errors import PlmtoolError

Message = dict[str, str]
Conversation = list[Message]

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "assistant": "assistant", "system": "system"}


def iter_json_array(text: str) -> Iterator[Any]:
    """Yield the elements of a JSON array one by one, stopping silently where the text is cut off.

    The embedded ShareGPT file is truncated mid-object: `json.loads` rejects it as a whole, but
    every element before the cut is complete and valid.
    """
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated tail
        yield obj


def sharegpt_to_messages(record: dict[str, Any]) -> Conversation | None:
    """ShareGPT record -> messages; None if empty, of unknown roles, or not user/assistant alternating."""
    turns = record.get("conversations") or record.get("items") or []
    messages: Conversation = []
    for turn in turns:
        role = _SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        content = turn.get("value")
        if role is None or not isinstance(content, str):
            return None
        if role == "system":
            if messages:
                return None
        elif messages and messages[-1]["role"] == role:
            return None
        messages.append({"role": role, "content": content})
    # The "_split" ShareGPT release cuts long chats into chunks: a chunk may start with the
    # assistant's reply to a question in the previous chunk, or end on an unanswered user turn.
    # Trim those edges (as FastChat's preprocessing does) rather than dropping the chunk.
    system = [m for m in messages if m["role"] == "system"]
    body = [m for m in messages if m["role"] != "system"]
    if body and body[0]["role"] == "assistant":
        body = body[1:]
    if body and body[-1]["role"] == "user":
        body = body[:-1]
    messages = system + body
    if len(body) < 2 or body[0]["role"] != "user" or body[-1]["role"] != "assistant":
        return None
    if any(not m["content"].strip() for m in body):
        return None
    return messages


def load_sharegpt(path: str | None = None, limit: int | None = None, with_ids: bool = False):
    """Complete, well-formed conversations from a ShareGPT JSON file (default: the embedded one)."""
    file = Path(path).expanduser() if path else embedded_file("sharegpt")
    if not file.is_file():
        raise PlmtoolError(f"ShareGPT file {file} not found")
    out = []
    for record in iter_json_array(file.read_text(encoding="utf-8")):
        if not isinstance(record, dict):
            continue
        messages = sharegpt_to_messages(record)
        if messages is None:
            continue
        out.append((str(record.get("id", len(out))), messages) if with_ids else messages)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise PlmtoolError(f"{file}: no complete conversations found")
    return out


def record_to_messages(obj: Any, where: str) -> Conversation:
    """One JSONL record -> messages. Accepts `messages`, ShareGPT `conversations`, or instruction/input/output."""
    if not isinstance(obj, dict):
        raise PlmtoolError(f"{where}: expected a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise PlmtoolError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise PlmtoolError(f"{where}: each message needs role (system/user/assistant) and string content")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "conversations" in obj:
        msgs = sharegpt_to_messages(obj)
        if msgs is None:
            raise PlmtoolError(f"{where}: 'conversations' is not an alternating human/gpt conversation")
        return msgs
    if "instruction" in obj:
        if "output" not in obj:
            raise PlmtoolError(f"{where}: missing field 'output'")
        if not isinstance(obj["instruction"], str) or not isinstance(obj["output"], str):
            raise PlmtoolError(f"{where}: 'instruction' and 'output' must be strings")
        prompt = obj["instruction"]
        if obj.get("input"):
            prompt = f"{prompt}\n\n{obj['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]
    raise PlmtoolError(f"{where}: expected 'messages', 'conversations' or 'instruction'/'output' fields")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-empty line; malformed JSON names file:line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PlmtoolError(f"data file {file} not found")
    with file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise PlmtoolError(f"{file}:{lineno}: malformed JSON ({e.msg})") from None


def load_chat_jsonl(path: str | Path) -> list[Conversation]:
    convs = [record_to_messages(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path)]
    if not convs:
        raise PlmtoolError(f"{path}: no records")
    return convs


def load_conversations(source: str, limit: int | None = None) -> list[Conversation]:
    """`sharegpt` (embedded), a ShareGPT .json file, or a chat/instruction .jsonl file."""
    if source == "sharegpt":
        return load_sharegpt(limit=limit)
    if source.endswith(".json"):
        return load_sharegpt(source, limit=limit)
    convs = load_chat_jsonl(source)
    return convs[:limit] if limit else convs


def load_mtbench(path: str | None = None) -> list[dict[str, Any]]:
    """MT-Bench / Spec-Bench questions: {"question_id", "category", "turns": [str, ...]}."""
    file = Path(path).expanduser() if path else embedded_file("mtbench")
    questions = []
    for lineno, obj in iter_jsonl(file):
        if not isinstance(obj, dict) or not isinstance(obj.get("turns"), list) or not obj["turns"]:
            raise PlmtoolError(f"{file}:{lineno}: expected an object with a non-empty 'turns' list")
        questions.append({"question_id": obj.get("question_id", lineno), "category": obj.get("category", "unknown"), "turns": [str(t) for t in obj["turns"]]})
    return questions
