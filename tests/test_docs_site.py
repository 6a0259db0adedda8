"""The docs site (mkdocs.yml): every page under docs/ is in the nav, nothing is fetched from the
network, and the strict build fails on a broken link and on an API reference that does not resolve.
`make docs` / `make test` build the whole site; these checks are the quick part."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def _nav_pages(nav) -> list[str]:
    pages: list[str] = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_docs_page_is_in_the_nav():
    nav = _nav_pages(_config()["nav"])
    twice = sorted({p for p in nav if nav.count(p) > 1})
    assert not twice, f"pages listed twice in mkdocs.yml's nav: {twice}; keep one entry each"
    listed = set(nav)
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    missing = sorted(pages - listed)
    assert not missing, (
        f"docs pages missing from mkdocs.yml's nav: {missing}; add each under `nav:` in mkdocs.yml "
        "(e.g. `  - My topic: my-page.md`), or the site will not link to it")
    generated = {"results.md"}  # bench/RESULTS.md, published by mkdocs_hooks.py
    assert not sorted(listed - pages - generated), "the nav lists pages that do not exist"


def test_the_site_uses_no_network_and_builds_strictly():
    cfg = _config()
    assert cfg["strict"] is True and cfg["theme"]["font"] is False
    assert not [x for x in cfg.get("extra_javascript", []) + cfg.get("extra_css", [])
                if "://" in str(x)]
    assert all(v in ("warn", "info") for v in cfg["validation"]["links"].values())
    makefile = (ROOT / "Makefile").read_text()
    start = makefile.index("\ntest:")
    test_target = makefile[start:makefile.index("\n\n", start)]
    assert "$(DOCS_BUILD)" in test_target and "--strict" in makefile


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_strict_build_fails_on_a_broken_link_and_a_missing_reference(tmp_path):
    def build(page: str) -> subprocess.CompletedProcess:
        docs = tmp_path / "docs"
        shutil.rmtree(docs, ignore_errors=True)
        docs.mkdir()
        (docs / "index.md").write_text(page)
        cfg = {k: v for k, v in _config().items() if k not in ("hooks", "nav")}
        cfg.update(docs_dir=str(docs), site_dir=str(tmp_path / "site"))
        cfg["plugins"][1]["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT / "src")]
        (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(cfg))
        return subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict",
                               "-f", str(tmp_path / "mkdocs.yml")], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})

    # (the good case is `make docs` itself: the whole site, with its API reference, builds)
    broken = build("# Home\n\nSee [the page](nowhere.md).\n")
    assert broken.returncode != 0 and "nowhere.md" in broken.stderr
    missing = build("# Home\n\n::: deltatune.no_such_module\n")
    assert missing.returncode != 0 and "no_such_module" in missing.stderr
