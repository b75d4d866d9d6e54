"""The documents a clone carries link only to files the clone has, and the README stays short."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200  # issue 12: the README is what memengine is, two commands, the demo, examples, links
# Markdown links (with an optional #anchor) and `code spans` that name a .md file by a relative path.
LINK = re.compile(r"\]\(([^)#\s]+)(?:#([^)\s]*))?[^)]*\)|`([^`\s]+\.md)`")
HTML_COMMENT = re.compile(r"<!--.*?-->", flags=re.DOTALL)


def rendered(text):
    """The text a reader sees: HTML comments (notes to maintainers, placeholders) are not rendered."""
    return HTML_COMMENT.sub("", text)


def links(text):
    """(target, anchor or None) of each relative link of a Markdown text."""
    for match in LINK.finditer(rendered(text)):
        target = match.group(1) or match.group(3)
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not files
            yield target, match.group(2)


def relative_links(text):
    return [target for target, _ in links(text)]


def heading_anchors(markdown):
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped, spaces to '-'."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_link_pattern_finds_markdown_links_and_code_spans():
    assert relative_links("see [x](docs/DESIGN.md#layers) and `../shared/DESIGN.md`, https://x.md") == [
        "docs/DESIGN.md",
        "../shared/DESIGN.md",
    ]


def test_links_inside_html_comments_are_not_rendered_so_not_checked():
    text = "[a](a.md) <!-- placeholder:\n![plot](docs/demo/plot.png)\n--> [b](b.md#part-2)"
    assert list(links(text)) == [("a.md", None), ("b.md", "part-2")]


def test_heading_anchors_follow_github():
    markdown = "# Title\n## The whole training step: Engine(budget=)\n### wgrad_accumulate_\n"
    assert heading_anchors(markdown) == {"title", "the-whole-training-step-enginebudget", "wgrad_accumulate_"}


def test_the_design_document_is_in_the_repository():
    assert (ROOT / "docs" / "DESIGN.md").is_file()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(document):
    broken = []
    for target, anchor in links(document.read_text()):
        path = (document.parent / target).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text()):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{document.relative_to(ROOT)} links to files or headings a clone does not have: {broken}"


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


def test_the_readme_links_every_documentation_page():
    linked = {(README.parent / target).resolve() for target in relative_links(README.read_text())}
    unlinked = [page.name for page in DOCUMENTS[1:] if page.resolve() not in linked]
    assert not unlinked, f"README.md does not link these docs/ pages: {unlinked}"
