"""The front page and the reference pages: every internal link resolves (file and heading), every
reference page is reachable from the front page, and the front page stays short."""
import glob
import os
import re

from conftest import ROOT

PAGES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CHANGELOG.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def headings(path):
    """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
    anchors, fence = set(), False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            text = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def links(path):
    text, fence, out = open(path, encoding="utf-8").read(), False, []
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            out += re.findall(r"\]\(([^)\s]+)\)", line)
    return out


def test_every_internal_link_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            if not os.path.exists(dest):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no file)")
            elif anchor and anchor not in headings(dest):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no heading)")
    assert not broken, "\n".join(broken)


def test_the_front_page_is_short_and_links_every_reference_page():
    readme = os.path.join(ROOT, "README.md")
    lines = open(readme, encoding="utf-8").read().splitlines()
    assert len(lines) <= 210
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for t in links(readme)}
    for page in PAGES[1:]:
        assert page in linked, f"{page} is not linked from README.md"
    first_screen = "\n".join(lines[:40])      # the finding with its intervals, a figure, the quickstart
    assert "does not beat oversampling" in first_screen and "95% CI" in first_screen and "![" in first_screen
    assert "## Quickstart" in first_screen and "demo.py" in first_screen and "pytest" in first_screen
