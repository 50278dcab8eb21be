"""Plain-text corpora by name, split into a calibration part and an evaluation part.

Names:
  wiki_sample  embedded Wikipedia articles (gensim wheel), cleaned of markup, split by article
  news_sample  embedded news articles (lee_background.cor, gensim wheel), split by article
  wikitext2    hub: wikitext-2-raw-v1, train -> calib, test -> eval
  c4           hub: allenai/c4 en, train shard 0 -> calib, validation shard 0 -> eval
  <path>       local .txt (documents separated by blank lines) or .jsonl (one object per line)

Embedded and local corpora are split by document: every `EVAL_EVERY`-th document goes to the
evaluation part, the rest to calibration, so the two never share a document.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from plmtool.data.embedded import embedded_file
from plmtool.errors import PlmtoolError
from plmtool.paths import cache_dir

log = logging.getLogger("plmtool")

SPLITS = ("calib", "val", "eval")
EMBEDDED = ("wiki_sample", "news_sample")
HUB = ("wikitext2", "c4")
EVAL_EVERY = 5  # document i is in the eval split iff i % EVAL_EVERY == EVAL_EVERY - 1
# ... and in the validation split (for choosing hyper-parameters) iff i % VAL_EVERY == VAL_AT; the
# calibration split is the rest, so the three never share a document.
VAL_EVERY, VAL_AT = 10, 3
CLEANING_VERSION = 4  # bump when the wiki cleaning changes so caches are rebuilt
# How documents are joined before tokenizing, per the reference implementations.
JOINERS = {"c4": " "}
DEFAULT_JOINER = "\n\n"
C4_EVAL_DOCS = 1100  # the SparseGPT/Wanda C4 evaluation uses the first 1100 validation documents


def known_corpora() -> tuple[str, ...]:
    return EMBEDDED + HUB


def split_of(i: int) -> str:
    if i % EVAL_EVERY == EVAL_EVERY - 1:
        return "eval"
    return "val" if i % VAL_EVERY == VAL_AT else "calib"


def split_by_document(docs: list[str], split: str) -> list[str]:
    # Exact duplicates (the news sample has some) would otherwise land on two sides of the split.
    docs = list(dict.fromkeys(docs))
    chosen = [d for i, d in enumerate(docs) if split_of(i) == split]
    if not chosen:
        raise PlmtoolError(f"corpus has {len(docs)} documents: too few to split into calibration, validation and evaluation parts")
    return chosen


def load_documents(name: str, split: str, data_cfg: Any = None) -> list[str]:
    """Documents of corpus `name` in `split` ("calib", "val" or "eval")."""
    if split not in SPLITS:
        raise PlmtoolError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    cache = getattr(data_cfg, "cache_dir", None)
    if name == "wiki_sample":
        return split_by_document([a["text"] for a in _wiki_articles(cache)], split)
    if name == "news_sample":
        lines = embedded_file("news_sample").read_text(encoding="utf-8").splitlines()
        return split_by_document([ln.strip() for ln in lines if ln.strip()], split)
    if name == "wikitext2":
        return _hub_wikitext2(split)
    if name == "c4":
        return _hub_c4(split)
    path = Path(name).expanduser()
    if path.is_file():
        return split_by_document(_local_documents(path, getattr(data_cfg, "text_field", "text")), split)
    raise PlmtoolError(f"unknown corpus '{name}': not one of {', '.join(known_corpora())} and no file at {path}")


def check_corpus(name: str, data_cfg: Any = None) -> None:
    """A local corpus file exists, decodes as UTF-8 and splits into parts: checked before any model
    loads. (Embedded and hub corpora are found where they are read.)"""
    if name not in known_corpora():
        load_documents(name, "eval", data_cfg)


def joined_text(name: str, split: str, data_cfg: Any = None) -> str:
    docs = load_documents(name, split, data_cfg)
    return JOINERS.get(name, DEFAULT_JOINER).join(docs)


def eval_tokens(tokenizer, name: str, data_cfg: Any = None, split: str = "eval"):
    """The evaluation (or validation) split joined and tokenized once: a 1-D LongTensor (no special
    tokens added)."""
    import torch

    ids = tokenizer(joined_text(name, split, data_cfg), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


# --- embedded -------------------------------------------------------------------------------


def _wiki_articles(cache: str | None) -> list[dict[str, str]]:
    from plmtool.data.wikitext_clean import clean_dump

    target = cache_dir(cache) / "corpora" / f"wiki_sample.v{CLEANING_VERSION}.json"
    if target.is_file():
        return json.loads(target.read_text(encoding="utf-8"))
    log.info("cleaning the embedded Wikipedia sample once (cached in %s)", target)
    articles = clean_dump(embedded_file("wiki_sample"))
    from plmtool.io import write_json

    write_json(target, articles)
    return articles


# --- local files ------------------------------------------------------------------------------


def _local_documents(path: Path, text_field: str) -> list[str]:
    text = _read_utf8(path)
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PlmtoolError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise PlmtoolError(f"{path}:{lineno}: expected an object with a string field '{text_field}'")
            docs.append(obj[text_field])
        return docs
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PlmtoolError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert the file to UTF-8"
        ) from None


# --- hub (for users who have one) -------------------------------------------------------------


def _load_dataset(*args, **kwargs):
    try:
        from datasets import load_dataset

        return load_dataset(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types when offline
        raise PlmtoolError(
            f"could not load dataset {args[0]!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "offline users can use data.corpus=wiki_sample|news_sample or a local file"
        ) from None


def _hub_wikitext2(split: str) -> list[str]:
    ds = _load_dataset("wikitext", "wikitext-2-raw-v1", split={"calib": "train", "val": "validation", "eval": "test"}[split])
    return list(ds["text"])


def _hub_c4(split: str) -> list[str]:
    if split == "calib":
        ds = _load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        return list(ds["text"])
    ds = _load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")
    # evaluation: the references' first 1100 validation documents; validation: the next 1100
    return list(ds["text"][:C4_EVAL_DOCS] if split == "eval" else ds["text"][C4_EVAL_DOCS : 2 * C4_EVAL_DOCS])
