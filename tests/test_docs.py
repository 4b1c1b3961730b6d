"""The documentation's links: every relative link in README.md and docs/*.md names a file of the repository, and
every `#anchor` into a markdown file names one of its headings (GitHub's slug) or an explicit `<a id="...">`;
every guide under docs/ is one click from the README."""

from __future__ import annotations

import glob
import os
import re
import unicodedata

import pytest

from tests.helpers.paths import ROOT

DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the text may hold one level of brackets; the target ends at a space or ")".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXPLICIT_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (links reduced to their text, markup dropped), lower case,
    punctuation removed except '-' and '_', each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: str) -> set:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found, seen = set(EXPLICIT_ANCHOR.findall(text)), {}
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: str):
    """(line number, target) of every link outside code."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for number, line in prose_lines(text):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            yield number, target


def broken_links(path: str) -> list:
    """'file:line: target (why)' for each relative link that leads nowhere."""
    broken, here = [], os.path.dirname(path)
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(here, file_part)) if file_part else path
        where = f"{os.path.relpath(path, ROOT)}:{number}: {target}"
        if not os.path.exists(resolved):
            broken.append(f"{where} (no file {os.path.relpath(resolved, ROOT)})")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{where} (no heading or anchor #{anchor} in {os.path.relpath(resolved, ROOT)})")
    return broken


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_and_anchors_resolve(doc):
    broken = broken_links(os.path.join(ROOT, doc))
    assert not broken, "\n".join(broken)


def test_every_guide_is_linked_from_the_readme():
    targets = {os.path.normpath(t.partition("#")[0]) for _, t in links(os.path.join(ROOT, "README.md"))}
    missing = [doc for doc in DOCS[1:] if doc not in targets]
    assert not missing, f"docs/ guides the README does not link to: {missing}"


def test_slugs_follow_github():
    assert slug("§13 Checkpoint format") == "13-checkpoint-format"
    assert slug("`--no-load-optim`, `--no-load-rng`, `--finetune`") == "--no-load-optim---no-load-rng---finetune"
    assert slug("Zero-shot tasks (lm-evaluation-harness)") == "zero-shot-tasks-lm-evaluation-harness"
    assert slug("Inspecting a model's concepts") == "inspecting-a-models-concepts"
    assert slug("See [the guide](docs/x.md)") == "see-the-guide"


def test_a_broken_link_and_a_broken_anchor_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n<a id=\"s1\"></a>\n## Second part\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#second-part) [ok](other.md#s1) [ok](#page) [ok](https://x.org/#a)\n"
                    "[gone](missing.md) [bad anchor](other.md#third-part) [bad local](#nowhere)\n"
                    "```\n[in code](missing.md)\n```\n`[inline](missing.md)`\n")
    found = [b.split(": ", 1)[1].split(" (")[0] for b in broken_links(str(page))]
    assert found == ["missing.md", "other.md#third-part", "#nowhere"], found
