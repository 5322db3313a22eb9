"""The manual (docs/, MkDocs) builds with every link and anchor right, and the README's and ARCHITECTURE.md's
links point at files that exist: a moved page or a renamed heading fails here, not in a reader's browser."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_manual_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "restore" / "index.html").exists()


def test_every_page_is_in_the_nav_and_the_front_doors_links_resolve():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if p not in nav] == []
    for doc in ("README.md", "ARCHITECTURE.md", "docker/README.md"):
        path = ROOT / doc
        for target in LINK.findall(path.read_text()):
            if target.startswith(("http://", "https://", "#")):
                continue
            assert (path.parent / target.split("#")[0]).exists(), f"{doc} links to {target}, which does not exist"


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 80
    assert text.index("make run") < text.index("make test") < 1200  # the two commands come first
