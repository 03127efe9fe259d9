"""The README is a landing page whose examples run as written, and every page it sends a reader to
exists: the Python examples of the README and of the docs pages that took over its reference text
run, their links (files and #anchors) resolve, and every docs/ page can be reached from it."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: The pages that hold what the README used to carry (their examples ran from the README before).
MOVED = [ROOT / "docs" / name for name in ("ops.md", "packing.md", "loop.md", "performance.md",
                                            "scale-overview.md", "status.md", "first-run.md")]
EXAMPLE_PAGES = [README] + [p for p in MOVED if p.exists()]
BLOCKS = [(page, i, block) for page in EXAMPLE_PAGES
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page,index,block", BLOCKS, ids=[f"{p.relative_to(ROOT)}#{i}" for p, i, _ in BLOCKS])
def test_python_block_runs(page, index, block):
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"{page.relative_to(ROOT)}, Python block {index}:\n{proc.stderr[-3000:]}"


def github_anchor(heading: str) -> str:
    """The #anchor GitHub gives a Markdown heading: lower case, punctuation other than '-' and '_'
    dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '# comment' in a code block is no heading
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def local_links(page: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """(target file, anchor or '') of every relative link of ``page``."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        out.append(((page.parent / path).resolve() if path else page, anchor))
    return out


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLE_PAGES])
def test_links_resolve(page):
    broken = []
    for target, anchor in local_links(page):
        if not target.exists():
            broken.append(f"{target.relative_to(ROOT)} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{target.relative_to(ROOT)}#{anchor} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [README]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.exists():
            continue
        seen.add(page)
        todo += [target for target, _ in local_links(page)]
    lost = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if p.resolve() not in seen)
    assert not lost, f"docs pages no link from README.md leads to: {lost}"


def test_readme_is_a_landing_page_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 300, "README.md is the landing page (<= 300 lines): move details to docs/"
    for command in ("bash scripts/main.sh", "bash scripts/test.sh"):
        assert command in text, f"README.md lost its set-up command {command!r}"
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text(), "CI no longer runs the README's test command"
