"""`wiki_next_sentence`: a zero-shot multiple-choice task built offline from real text.

A task generated from the evaluation articles of the embedded Wikipedia sample (never the
calibration articles); the standard tasks run offline from their embedded copies
(`plmtool.eval.local_tasks`), this one is kept as a text-coherence probe that needs no wheel but gensim:

  * context  = `context_sentences` consecutive sentences of one paragraph,
  * choices  = the sentence that really follows them (same paragraph) + `choices - 1` distractors,
  * the distractors are other sentences of the *same article* (so topic and vocabulary match and
    only local coherence tells them apart), never the context, the true sentence or their
    immediate neighbours, and preferably of similar length (so a length bias cannot solve it).

The choice order is shuffled; everything is drawn from `random.Random(seed)`, so a given
(documents, size, choices, seed) always gives the same examples. The examples are written as
JSONL plus an lm-eval task YAML (`dataset_path: json`) into a cache directory keyed by those
parameters and a hash of the text; lm-eval finds it through `include_path`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from plmtool.errors import PlmtoolError
from plmtool.io import atomic_write, write_text
from plmtool.paths import cache_dir

TASK_NAME = "wiki_next_sentence"
GENERATOR_VERSION = 2  # bump when the generation rules change so cached tasks are rebuilt
CORPUS = "wiki_sample"
CONTEXT_SENTENCES = 3
MIN_CHARS, MAX_CHARS = 30, 300  # sentences outside this range are not used as targets/distractors
MIN_WORDS = 5
LENGTH_RATIO = 1.2  # distractors preferably within [len/ratio, len*ratio] of the true sentence
NEIGHBOUR_GAP = 2  # distractors keep this many sentences away from the context and the true one

# A sentence ends at . ! or ? (optionally followed by a closing quote/bracket) before whitespace and
# an upper-case letter, digit or opening quote. Common abbreviations must not end a sentence.
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(])")
_ABBREV = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|Gen|Col|Lt|Sgt|Mt|Ft|vs|etc|[Nn]o|Nos|Vol|pp|ca|c|e\.g|i\.e|U\.S|U\.K|[A-Z])\.$")
# A usable sentence ends like one; headings and list items ("Early life", "ATP Award: 1998") don't.
_ENDS = re.compile(r"[.!?][\"')\]]?$")


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences (rule-based; good enough for encyclopedic prose)."""
    pieces: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(paragraph):
        candidate = paragraph[start : m.start() + len(m.group(0).rstrip())].strip()
        # Don't split after an abbreviation or an initial ("J. R. R. Tolkien", "U.S. Army").
        if _ABBREV.search(paragraph[start : m.start()].rstrip()):
            continue
        if candidate:
            pieces.append(candidate)
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        pieces.append(tail)
    return pieces


def _usable(sentence: str) -> bool:
    return (
        MIN_CHARS <= len(sentence) <= MAX_CHARS and len(sentence.split()) >= MIN_WORDS and bool(_ENDS.search(sentence))
    )


def generate_examples(
    documents: list[str],
    size: int,
    choices: int = 4,
    seed: int = 0,
    context_sentences: int = CONTEXT_SENTENCES,
) -> list[dict[str, Any]]:
    """Multiple-choice next-sentence examples from `documents` (one article per document).

    Each example: {"context", "choices" (list[str]), "label" (index of the true sentence),
    "article" (document index), "position" (sentence index of the true sentence in the article)}.
    """
    if size < 1:
        raise PlmtoolError(f"eval.offline_task_size must be at least 1 (got {size})")
    if choices < 2:
        raise PlmtoolError(f"eval.offline_task_choices must be at least 2 (got {choices})")
    rng = random.Random(seed)

    # Per article: its sentences in order, and for each the paragraph it belongs to.
    articles: list[tuple[list[str], list[int]]] = []
    for doc in documents:
        sents: list[str] = []
        para_of: list[int] = []
        for p, paragraph in enumerate(doc.split("\n")):
            for s in split_sentences(paragraph):
                sents.append(s)
                para_of.append(p)
        articles.append((sents, para_of))

    # Slots: (article, i) where the usable sentence i follows `context_sentences` sentences of its own
    # paragraph. (A slot whose article lacks enough distractors is skipped below.)
    slots: list[tuple[int, int]] = []
    for a, (sents, para_of) in enumerate(articles):
        for i in range(context_sentences, len(sents)):
            if not _usable(sents[i]):
                continue
            if any(para_of[j] != para_of[i] for j in range(i - context_sentences, i)):
                continue
            slots.append((a, i))
    if not slots:
        raise PlmtoolError("no paragraph in the evaluation documents is long enough to build the offline task")

    rng.shuffle(slots)
    examples: list[dict[str, Any]] = []
    for a, i in slots:
        if len(examples) >= size:
            break
        sents, _ = articles[a]
        true = sents[i]
        context_set = set(sents[i - context_sentences : i])
        # Not the context, not the true sentence, not their neighbours (a neighbour could be a fair
        # continuation too), and no text equal to any of them (articles repeat short sentences).
        near = range(i - context_sentences - NEIGHBOUR_GAP, i + NEIGHBOUR_GAP + 1)
        pool = sorted(
            {s for j, s in enumerate(sents) if j not in near and _usable(s) and s != true and s not in context_set}
        )
        if len(pool) < choices - 1:
            continue
        similar = [s for s in pool if len(true) / LENGTH_RATIO <= len(s) <= len(true) * LENGTH_RATIO]
        if len(similar) >= choices - 1:
            distractors = rng.sample(similar, choices - 1)
        else:  # short articles: top up with the closest lengths
            rest = sorted(set(pool) - set(similar), key=lambda s: (abs(len(s) - len(true)), s))
            distractors = similar + rest[: choices - 1 - len(similar)]
        options = [true] + distractors
        rng.shuffle(options)
        examples.append(
            {
                "context": " ".join(sents[i - context_sentences : i]),
                "choices": options,
                "label": options.index(true),
                "article": a,
                "position": i,
            }
        )
    if len(examples) < size:
        raise PlmtoolError(
            f"the evaluation documents yield only {len(examples)} offline-task examples with "
            f"{choices} choices; lower eval.offline_task_size (asked {size})"
        )
    return examples


def task_yaml(data_file: Path, task_name: str = TASK_NAME) -> str:
    """lm-eval task config reading the generated JSONL as a local `json` dataset."""
    return "\n".join(
        [
            "# Generated by plmtool (plmtool/eval/offline_task.py); do not edit.",
            f"task: {task_name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data_file))}",
            "test_split: test",
            "output_type: multiple_choice",
            "doc_to_text: context",
            "doc_to_choice: choices",
            "doc_to_target: label",
            'target_delimiter: " "',
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            f"  version: {GENERATOR_VERSION}.0",
            "",
        ]
    )


def build_task(
    documents: list[str],
    size: int,
    choices: int = 4,
    seed: int = 0,
    root: str | Path | None = None,
) -> Path:
    """Generate (or reuse) the task files; return the directory to pass as lm-eval include_path."""
    digest = hashlib.sha1("\x00".join(documents).encode("utf-8")).hexdigest()[:10]
    base = Path(root) if root is not None else cache_dir() / "tasks"
    task_dir = base / f"{TASK_NAME}-v{GENERATOR_VERSION}-n{size}-c{choices}-s{seed}-{digest}"
    yaml_path = task_dir / f"{TASK_NAME}.yaml"
    if yaml_path.is_file():  # written last, so its presence means the task is complete
        return task_dir
    examples = generate_examples(documents, size, choices, seed)
    data_file = task_dir / "test.jsonl"

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for ex in examples:
                fh.write(json.dumps(ex, ensure_ascii=False) + "\n")

    atomic_write(data_file, _write)
    write_text(yaml_path, task_yaml(data_file.resolve()))
    return task_dir


def offline_task_dir(size: int, choices: int, seed: int = 0, data_cfg: Any = None) -> Path:
    """The wiki_next_sentence task built from the evaluation split of the embedded Wikipedia sample."""
    from plmtool.data.corpora import load_documents

    documents = load_documents(CORPUS, "eval", data_cfg)
    root = cache_dir(getattr(data_cfg, "cache_dir", None)) / "tasks"
    return build_task(documents, size, choices, seed, root)
