"""MkDocs hooks: the site shows files that live outside docs/ where a reader of the checkout finds them.

The README is the home page, and the changelog, the benchmark reports, the notebooks and the license are pages of
the site, without copies: each is added under a site path, and the relative links of every Markdown page, written
for the checkout (``docs/cohort.md`` from the README, ``../benchmarks/COHORT.md`` from a guide), are rewritten to
the site paths. A link to a file that is not on the site stays as written, and the strict build reports it.
A benchmark report or notebook that mkdocs.yml's navigation does not list joins the end of its section, under its
first heading.
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]

# Files outside docs/ on the site: their path in the checkout, and their path on the site.
OUTSIDE = {
    "README.md": "index.md",
    "CHANGELOG.md": "changelog.md",
    "LICENSE": "LICENSE.txt",
    **{f"benchmarks/{p.name}": f"benchmarks/{p.name}" for p in sorted((ROOT / "benchmarks").glob("*.md"))},
    **{f"notebooks/{p.name}": f"notebooks/{p.name}" for p in sorted((ROOT / "notebooks").glob("*.ipynb"))},
}
LINK = re.compile(r"(\]\()([^)\s#]+)(#[^)\s]*)?(\))")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.M | re.S)


def _title(path: Path) -> str:
    """The first heading of a Markdown file or of a notebook's first Markdown cell."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    else:
        text = path.read_text()
    heading = re.search(r"^#+\s+(.+)$", text, flags=re.M)
    return heading.group(1).strip() if heading else path.stem


def on_config(config: Any) -> Any:
    sections = {"benchmarks/": "Benchmarks", "notebooks/": "Notebooks"}
    for entry in config["nav"] or []:
        if not isinstance(entry, dict) or len(entry) != 1:
            continue
        (name, items), = entry.items()
        prefix = next((p for p, section in sections.items() if section == name), None)
        if prefix is None or not isinstance(items, list):
            continue
        listed = {v if isinstance(v, str) else next(iter(v.values())) for v in items}
        for site in OUTSIDE.values():
            if site.startswith(prefix) and site not in listed and site.endswith((".md", ".ipynb")):
                items.append({_title(ROOT / site): site})
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns the added notebooks into pages
def on_files(files: Files, config: Any) -> Files:
    for source, site in OUTSIDE.items():
        files.append(File.generated(config, site, abs_src_path=str(ROOT / source)))
    return files


def _checkout_path(src_uri: str) -> str:
    """Where the page with this site path lives in the checkout."""
    for source, site in OUTSIDE.items():
        if site == src_uri:
            return source
    return f"docs/{src_uri}"


def _rewrite(markdown: str, src_uri: str) -> str:
    here = _checkout_path(src_uri)
    site_of = dict(OUTSIDE)

    def link(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            return match.group(0)  # an address, not a file of the checkout
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(here), target))
        if resolved in site_of:
            site = site_of[resolved]
        elif resolved.startswith("docs/"):
            site = resolved.removeprefix("docs/")
        else:
            return match.group(0)
        relative = posixpath.relpath(site, posixpath.dirname(src_uri) or ".")
        return f"{match.group(1)}{relative}{match.group(3) or ''}{match.group(4)}"

    pieces, last = [], 0
    for fence in FENCE.finditer(markdown):  # links inside code blocks are code
        pieces.append(LINK.sub(link, markdown[last : fence.start()]))
        pieces.append(fence.group(0))
        last = fence.end()
    pieces.append(LINK.sub(link, markdown[last:]))
    return "".join(pieces)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    return _rewrite(markdown, page.file.src_uri)
