"""Every relative link and image in README.md and docs/**/*.md (and the Markdown notes in prunedlora/ and
benchmarks/) resolves: the file or folder exists in the checkout, and a ``#section`` of a Markdown file
names one of its headings (GitHub's anchors).

Why: the docs are read on GitHub and in the checkout, and they point at plots, results and each other;
moving a file (as splitting the README into docs/ pages does) silently breaks links nobody clicks in
review. Web links are not followed (no network in the tests). Code blocks and inline code are skipped:
a path there is an example, not a link.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the user's guide and its pages, and the notes beside the code and the results they point into
DOCS = [
    ROOT / "README.md",
    *(p for folder in ("docs", "prunedlora", "benchmarks") for p in sorted((ROOT / folder).rglob("*.md"))),
]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_INLINE_CODE = re.compile(r"`+[^`\n]*`+")
# [text](target "title") and ![alt](target); the text may hold one level of brackets (an image in a link)
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
_HTML = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href|srcset)=\"([^\"]+)\"", re.I)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto: ...


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return [m.group(1) for pattern in (_INLINE, _REFERENCE, _HTML) for m in pattern.finditer(body)]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", markdown), re.M):
        text = re.sub(r"<[^>]+>", "", heading)
        text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken(doc: Path) -> list[str]:
    problems = []
    for target in links(doc.read_text()):
        if _EXTERNAL.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        path = (doc.parent / unquote(path_part)).resolve() if path_part else doc
        if not path.exists():
            problems.append(f"{target} (no {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
        elif fragment and path.suffix == ".md" and unquote(fragment).lower() not in anchors(path.read_text()):
            problems.append(f"{target} (no heading #{fragment} in {path.name})")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    assert broken(doc) == []


def test_the_checker_sees_a_broken_link_and_a_broken_anchor(tmp_path):
    """The checker itself: good links pass, a missing file, image or heading is reported, code is skipped."""
    (tmp_path / "plot.png").write_bytes(b"")
    doc = tmp_path / "page.md"
    doc.write_text(
        "# Results\n\n## The table (rank 8)\n\n"
        "[ok](plot.png) ![ok](./plot.png) [here](#the-table-rank-8) [web](https://example.com/x)\n"
        "[gone](missing.md) ![gone](img/none.png) [bad anchor](page.md#nowhere)\n"
        "`[code](not-a-link.md)`\n\n```\n[block](not-a-link-either.md)\n```\n"
        '<img src="absent.png">\n\n[ref]: other/missing.txt\n'
    )
    reported = broken(doc)
    assert [r.split(" ")[0] for r in reported] == [
        "missing.md",
        "img/none.png",
        "page.md#nowhere",
        "other/missing.txt",
        "absent.png",
    ]
