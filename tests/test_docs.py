"""The README and docs/ stay navigable: every relative link and image resolves, every page is
reachable from the README, and the README lists every command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [README, *PAGES]

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
MARKDOWN_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_SRC_OR_HREF = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    # Links inside code are examples, not links.
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _targets(path: Path) -> list[str]:
    prose = _prose(path.read_text(encoding="utf-8"))
    return MARKDOWN_LINK.findall(prose) + HTML_SRC_OR_HREF.findall(prose)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(h) for h in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8")))}


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(document):
    broken = []
    for target in _targets(document):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (document.parent / file_part).resolve() if file_part else document
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target}: no heading #{fragment}")
    assert not broken, f"{document.relative_to(ROOT)}: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _targets(README)}
    assert [p.name for p in PAGES if p.resolve() not in linked] == []


def test_readme_lists_every_command():
    from distilsd.cli import COMMANDS

    readme = README.read_text(encoding="utf-8")
    assert [name for name in COMMANDS if f"`distilsd {name}`" not in readme] == []


def test_readme_stays_a_newcomers_guide():
    # Detail and measurement history belong in docs/ (issue 21): keep the README short.
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 300
