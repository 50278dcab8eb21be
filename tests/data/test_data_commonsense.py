"""The commonsense pool: every split's size, and the rendering against the OLMES request files."""

from __future__ import annotations

import gzip
import json

import pytest

from plmtool.data import commonsense as cs
from plmtool.errors import PlmtoolError

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec(cs.PACKAGE) is None, reason=f"needs {cs.PIP}"
)


def _requests(task: str, variant: str) -> dict[int, list[dict]]:
    """The rc requests of each doc of a request file, as written by OLMES (independent of render)."""
    docs: dict[int, list[dict]] = {}
    with gzip.open(cs.package_root() / task / variant / "requests.jsonl.gz", "rt") as fh:
        for line in fh:
            r = json.loads(line)
            if r["doc_id"] < cs.UNCOND_OFFSET:
                docs.setdefault(r["doc_id"], []).append(r)
    return docs


@pytest.mark.parametrize("task", list(cs.TASKS))
def test_eval_examples_are_the_zero_shot_requests(task):
    source = cs.TASKS[task]
    examples = cs.examples(task, "eval")
    assert len(examples) == source.eval_size
    reqs = _requests(task, source.eval_variant)
    assert len(reqs) == len(examples)
    for ex, doc_reqs in zip(examples, reqs.values()):
        doc_reqs = sorted(doc_reqs, key=lambda r: r["idx"])
        assert [r["request"]["continuation"] for r in doc_reqs] == list(ex.continuations)
        contexts = [r["request"]["context"] for r in doc_reqs]
        if source.eval_variant == "rc_0shot":
            assert contexts == list(ex.contexts)
        else:  # 5-shot files: the doc's own context closes the prompt
            assert all(c.endswith(x) for c, x in zip(contexts, ex.contexts))
        assert doc_reqs[0]["label"] == ex.gold


def test_train_splits_have_their_published_sizes_and_one_format():
    sizes = {t: len(cs.examples(t, "train")) for t in cs.TASKS}
    assert sizes == {t: s.train_size for t, s in cs.TASKS.items()}
    assert sum(sizes.values()) == 157_321
    ex = cs.examples("winogrande", "train")[0]
    # the instruction is the sentence up to the blank, filled with the right option; the output the rest
    assert "_" not in ex.prompt and ex.prompt + " " + ex.answer == ex.contexts[ex.gold] + ex.continuations[ex.gold]
    rec = cs.examples("arc_easy", "train")[0].record()
    assert rec["task"] == "arc_easy" and rec["instruction"].startswith("Question: ") and not rec["output"].startswith(" ")


def test_unknown_task_names_the_pool():
    with pytest.raises(PlmtoolError, match="unknown commonsense task 'siqa'.*socialiqa"):
        cs.examples("siqa", "train")
