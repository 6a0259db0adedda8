"""mkdocs hooks for the docs site (mkdocs.yml: ``hooks``).

The measured figures live in bench/RESULTS.md, outside docs/, and the docs link to them as
``../bench/RESULTS.md`` so that the links work when the Markdown is read on a code host. On the site
that file is published as the page ``results.md`` and those links are pointed at it; the strict
build then checks them (anchors included) like any other link.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parent / "bench" / "RESULTS.md"
LINK = re.compile(r"\]\(\.\./bench/RESULTS\.md")


def on_files(files, config):
    files.append(File.generated(config, "results.md", content=RESULTS.read_text(encoding="utf-8")))
    return files


SPECS = "<!-- deltatune: method specs -->"


def on_page_markdown(markdown, page, config, files):
    if SPECS in markdown:
        markdown = markdown.replace(SPECS, _method_specs())
    return LINK.sub("](results.md", markdown)


def _method_specs() -> str:
    """A mkdocstrings block for every registered method spec (deltatune.methods fills its namespace
    from the registry at import, which static analysis cannot see)."""
    import deltatune.methods  # noqa: F401  (importing it registers every method)
    from deltatune.core.spec import registered_methods

    classes = sorted(set(registered_methods().values()), key=lambda c: c.__name__.lower())
    return "\n\n".join(f"::: {c.__module__}.{c.__qualname__}\n    options:\n      heading_level: 3"
                        for c in classes)
