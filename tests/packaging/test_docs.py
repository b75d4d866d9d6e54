"""The documents a clone carries link only to files the clone has."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Markdown links and `code spans` that name a .md file by a relative path.
LINK = re.compile(r"\]\(([^)#\s]+)[^)]*\)|`([^`\s]+\.md)`")


def relative_links(text):
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not files
            yield target


def test_link_pattern_finds_markdown_links_and_code_spans():
    assert list(relative_links("see [x](docs/DESIGN.md#layers) and `../shared/DESIGN.md`, https://x.md")) == [
        "docs/DESIGN.md",
        "../shared/DESIGN.md",
    ]


def test_the_design_document_is_in_the_repository():
    assert (ROOT / "docs" / "DESIGN.md").is_file()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(document):
    broken = []
    for target in relative_links(document.read_text()):
        path = (document.parent / target).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)} links to files a clone does not have: {broken}"
