"""The documentation site builds strictly: a broken link, a page left out of ``nav``, or a public
docstring that mkdocstrings cannot render fails the tests, as it would fail ``mkdocs build --strict``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mkdocs() -> str:
    return shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")


def test_docs_build_strictly(tmp_path: Path) -> None:
    if not Path(_mkdocs()).exists():
        pytest.fail('mkdocs is not installed: pip install -e ".[docs]" (the dev extra includes it).')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [_mkdocs(), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert not re.search(r"^(WARNING|ERROR)\b", log, re.MULTILINE), log
    # The API reference rendered the public names, with their docstring examples as code.
    api = (tmp_path / "site" / "api" / "optim" / "index.html").read_text()
    for name in ("APOLLO", "APOLLOMini", "LayerwiseOptimizer", "create_optimizer", "register_optimizer"):
        assert f'id="lightning_memopt.optim.{name}"' in api, name
    assert "Examples" in api


def test_every_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert pages, "no pages under docs/"
    missing = [page for page in pages if page not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}; add them there."


def test_readme_links_to_existing_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links, "the README links to no docs page"
    broken = [link for link in links if not (ROOT / link).exists()]
    assert not broken, f"README links to missing pages: {broken}"
    assert len(readme.splitlines()) <= 220, "the README is the front door, not the manual: move detail to docs/."
