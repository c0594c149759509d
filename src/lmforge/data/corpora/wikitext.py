"""Wikipedia dumps to plain text: read the pages of a MediaWiki XML export and strip their wiki markup.

The stripper keeps what a reader sees as prose and drops the rest:

    <!-- comments -->, <ref>...</ref>, <gallery>, <math>, ...   dropped with their content
    {{templates}} (nested), {| tables |} (nested)                 dropped
    [[target|shown text]] -> shown text, [[target]] -> target     innermost first, so captions nest
    [[File:...]], [[Image:...]], [[Category:...]], [[de:...]]    dropped (media, categories, interwiki)
    [http://url shown text] -> shown text                         bare [http://url] dropped
    == Heading == -> Heading, '''bold''' / ''italic'' -> text, list markers (* # : ;) at line starts dropped
    other <tags> dropped keeping their content; &entities; decoded

It is a readable approximation, not a MediaWiki parser: template output (infobox values, dates written by
{{birth date}}, ...) is lost, which is the usual trade-off of text-extraction tools for language modelling.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import BinaryIO

_DROP_WITH_CONTENT = ("ref", "gallery", "math", "timeline", "imagemap", "score", "syntaxhighlight", "source", "hiero")
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_ELEMENTS = re.compile(  # <ref name=x/> and <ref ...>...</ref>
    r"<(" + "|".join(_DROP_WITH_CONTENT) + r")\b[^>/]*(?:/>|>.*?</\1\s*>)", re.S | re.I
)
_INNER_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROPPED_LINK = re.compile(r"\s*:?\s*(?:(?i:file|image|media|category)|[a-z]{2,3}(?:-[a-z]+)*)\s*:")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\s*([^\]]*)\]")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)
_EMPHASIS = re.compile(r"'{2,}")
_TAG = re.compile(r"</?[a-zA-Z][^<>]*?/?>")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.M)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_RULE = re.compile(r"^-{4,}\s*$", re.M)
_TABLE_ROW = re.compile(r"^\s*(?:\|\}|\{\||\|-).*$", re.M)  # a row marker left by an unbalanced table


def _replace_until_stable(pattern: re.Pattern, replacement, text: str) -> str:
    while True:
        text, n = pattern.subn(replacement, text)
        if n == 0:
            return text


def _drop_media_links(text: str) -> str:
    """Drop [[File:...]], [[Image:...]], [[Category:...]] and interwiki links whole. Their captions may hold
    links and stray single brackets ("Bicyclo[1.1.0]butane"), so the end is found by counting [[ and ]]."""
    out, pos = [], 0
    for match in re.finditer(r"\[\[", text):
        start = match.start()
        if start < pos or not _DROPPED_LINK.match(text, start + 2):
            continue
        depth, i = 0, start
        while i < len(text) - 1:
            pair = text[i : i + 2]
            depth += (pair == "[[") - (pair == "]]")
            i += 2 if pair in ("[[", "]]") else 1
            if depth == 0:
                break
        out.append(text[pos:start])
        pos = i
    return "".join(out) + text[pos:]


def _link_text(match: re.Match) -> str:
    inner = match.group(1)
    if _DROPPED_LINK.match(inner):
        return ""
    target, _, shown = inner.partition("|")
    return (shown.rpartition("|")[2] if shown else target).strip()


def _drop_unclosed(text: str, opener: str) -> str:
    """A page cut mid-template leaves an `opener` that never closes: drop it and the rest of its paragraph."""
    return re.sub(re.escape(opener) + r".*?(?:\n\s*\n|\Z)", "\n\n", text, flags=re.S)


def strip_wiki_markup(wikitext: str) -> str:
    """Plain text of a page's wikitext (see the module docstring for what is kept)."""
    text = _COMMENT.sub("", wikitext)
    text = _ELEMENTS.sub("", text)
    text = _replace_until_stable(_INNER_TEMPLATE, "", text)
    text = _replace_until_stable(_INNER_TABLE, "", text)
    text = _drop_unclosed(_drop_unclosed(text, "{{"), "{|")
    text = _replace_until_stable(_INNER_LINK, _link_text, _drop_media_links(text))
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1), text)
    text = _HEADING.sub(lambda m: m.group(2), text)
    text = _EMPHASIS.sub("", text)
    text = re.sub(r"<br\s*/?>", "\n", text, flags=re.I)
    text = _TAG.sub("", text)
    text = _MAGIC_WORD.sub("", _RULE.sub("", _LIST_MARKER.sub("", _TABLE_ROW.sub("", text))))
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"\((?:\s*[,;])+\s*", "(", text)  # "(; , Akhilleus, )": templates dropped from a list
    text = re.sub(r"(?:\s*[,;])+\s*\)", ")", text)
    text = re.sub(r" ?\(\s*\)", "", text)  # "Alabama ({{IPA...}}) is" leaves "()"
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def iter_pages(xml_stream: BinaryIO) -> Iterator[dict]:
    """{"title", "id", "ns", "redirect", "wikitext"} for each <page> of a MediaWiki XML export, streamed."""
    for _, element in ET.iterparse(xml_stream, events=("end",)):
        if element.tag.rpartition("}")[2] != "page":
            continue
        fields = {child.tag.rpartition("}")[2]: child for child in element}
        revision = {child.tag.rpartition("}")[2]: child for child in fields["revision"]}
        yield {
            "title": fields["title"].text or "",
            "id": int(fields["id"].text),
            "ns": int(fields["ns"].text),
            "redirect": "redirect" in fields,
            "wikitext": revision["text"].text or "",
        }
        element.clear()


def articles(xml_stream: BinaryIO) -> Iterator[dict]:
    """{"title", "id", "text"} for each article of a dump: main namespace (0), not a redirect, markup stripped."""
    for page in iter_pages(xml_stream):
        if page["ns"] == 0 and not page["redirect"]:
            yield {"title": page["title"], "id": page["id"], "text": strip_wiki_markup(page["wikitext"])}
