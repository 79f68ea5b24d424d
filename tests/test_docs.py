"""The docs a newcomer starts from: README.md fits one read (<= 250 lines), links every page in docs/,
every relative link resolves, and CI runs exactly the test command the README gives."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {target for target in LINK.findall(readme)}
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages and pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"


def test_relative_links_resolve():
    for document in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in LINK.findall(document.read_text()):
            if "://" in target:
                continue
            assert (document.parent / target).exists(), f"{document.relative_to(ROOT)} links to missing {target}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test\s+#", readme, re.M)
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == "make test"
