"""Wikipedia XML dump -> plain article text (MediaWiki markup removed with mwparserfromhell)."""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

# Trailing sections that are lists of links or citations, not prose.
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography", "sources", "footnotes", "citations"}
_NON_PROSE_LINKS = ("file:", "image:", "category:", "media:")


def iter_pages(path: Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) for every main-namespace, non-redirect page of a (bz2) XML dump."""
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as fh:
        title, ns, text, redirect = None, None, None, False
        for _, elem in ET.iterparse(fh, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text
            elif tag == "ns":
                ns = elem.text
            elif tag == "redirect":
                redirect = True
            elif tag == "text":
                text = elem.text or ""
            elif tag == "page":
                if ns == "0" and not redirect and text:
                    yield title or "", text
                title, ns, text, redirect = None, None, None, False
                elem.clear()


def clean_wikitext(text: str) -> str:
    import mwparserfromhell

    # Citations first, by regex: inside malformed markup the parser leaves some <ref> tags as text.
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    code = mwparserfromhell.parse(text)
    for link in code.filter_wikilinks(recursive=True):
        if str(link.title).strip().lower().startswith(_NON_PROSE_LINKS):
            _remove(code, link)
    for node in code.filter_tags(recursive=True):
        if str(node.tag).lower() in ("ref", "table", "gallery", "math", "timeline", "references"):
            _remove(code, node)
    plain = code.strip_code(normalize=True, collapse=True, keep_template_params=False)
    out: list[str] = []
    dropping = False
    for line in plain.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"=+\s*(.*?)\s*=+", line)
        if heading:
            dropping = heading.group(1).lower() in _DROP_SECTIONS
            continue
        if dropping or not line:
            continue
        # Leftovers of tables / image captions and list bullets.
        if line.startswith(("{|", "|", "!", "thumb|")):
            continue
        line = re.sub(r"\{\{[^{}]*\}\}", "", line)  # templates the parser could not see
        line = re.sub(r"'{2,}", "", line)  # bold/italic quotes next to a link
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( ; )" left by removed templates
        line = re.sub(r"\s{2,}", " ", line).strip()
        if len(line.split()) >= 3:
            out.append(line)
    return "\n".join(out)


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:
        pass


def clean_dump(path: Path, min_words: int = 50) -> list[dict[str, str]]:
    articles = []
    for title, text in iter_pages(path):
        body = clean_wikitext(text)
        if len(body.split()) >= min_words:
            articles.append({"title": title, "text": body})
    return articles
