"""The documentation site builds strictly (warnings are errors), its pages render in a real browser (headless
Chromium, as tests/test_report_browser.py does), and no link between its pages is broken.

Skipped where the docs tooling is not installed (``pip install -e '.[docs]'``) and this is not CI; ``make test``
installs the ``dev`` extra, which has it, so CI always runs this test. Chromium: as in tests/test_report_browser.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter")
MISSING = [name for name in TOOLS if importlib.util.find_spec(name.split(".")[0]) is None]
CHROMIUM = shutil.which("chromium")
IN_CI = bool(os.environ.get("CI"))

pytestmark = pytest.mark.skipif(
    bool(MISSING) and not IN_CI,
    reason=f"the docs tooling is not installed ({', '.join(MISSING)}): pip install -e '.[docs]' (make test has it)",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if MISSING:
        pytest.fail(f"CI must have the docs tooling ({', '.join(MISSING)}): make test installs the dev extra")
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return out


class _Page(HTMLParser):
    """The links (href, src) and the ids of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "id" or (tag == "a" and name == "name"):
                self.ids.add(value)
            elif name in ("href", "src") and not (tag == "link" and ("rel", "canonical") in attrs):
                self.links.append(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(errors="replace"))
    return page


def test_the_site_has_every_page(site):
    for page in ("index.html", "own-model.html", "report.html", "chefer-setting.html", "models.html", "cohort.html",
                 "generation.html", "beyond-pyhealth.html", "changelog.html", "api/attribution.html",
                 "api/adapters.html", "api/relevance.html", "api/comparison.html", "api/cohort.html", "api/report.html",
                 "api/visualization.html", "api/llm.html", "benchmarks/index.html", "LICENSE.txt"):
        assert (site / page).is_file(), page
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks and all((site / "notebooks" / f"{name}.html").is_file() for name in notebooks)
    # rendered with the outputs they were saved with: a figure of notebook 02 is embedded as an image
    assert "data:image/png;base64," in (site / "notebooks" / "02_side_by_side.html").read_text()
    # the API reference is the docstrings': CheferAttribution's arguments and its doctest
    api = (site / "api" / "attribution.html").read_text()
    assert "code_split" in api and "PRESETS" in api and "toy_model_and_batch" in api


def test_no_internal_link_is_broken(site):
    """Every href and src of every page that points into the site names a file there, and its #fragment an id of
    that page."""
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 30
    parsed = {path: _parse(path) for path in pages}
    broken, checked = [], 0
    for path, page in parsed.items():
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "data:", "javascript:")):
                continue
            if not parts.path:
                target = path
            elif parts.path.startswith("/"):  # from the site's root (404.html, served for any address)
                target = (site / unquote(parts.path).lstrip("/")).resolve()
            else:
                target = (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            checked += 1
            where = f"{path.relative_to(site)} links {link}"
            if site not in (target, *target.parents):
                broken.append(f"{where}: outside the site")
            elif not target.is_file():
                broken.append(f"{where}: no such file")
            elif parts.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{where}: no id {parts.fragment!r} there")
    assert checked > 500
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken[:40])


def test_a_broken_link_is_found(site, tmp_path):
    """A control: the check above sees a link to a missing page and a missing fragment."""
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    page = copy / "models.html"
    broken = "<a href='nowhere.html'>x</a><a href='index.html#no-such'>y</a></body>"
    page.write_text(page.read_text().replace("</body>", broken))
    with pytest.raises(AssertionError, match="2 broken links"):
        test_no_internal_link_is_broken(copy)


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail("CI must have chromium: .ci/run installs it when missing")
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _rendered(page: Path, tmp_path: Path) -> tuple[str, float]:
    """The DOM after the page's scripts ran, and the share of its screenshot that is not white."""
    import numpy as np
    from PIL import Image

    dom = _chromium(["--virtual-time-budget=3000", "--dump-dom", page.resolve().as_uri()], tmp_path).stdout
    png = tmp_path / f"{page.stem}.png"
    _chromium([f"--screenshot={png}", "--window-size=1300,1400", page.resolve().as_uri()], tmp_path)
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return dom, float((image < 245).any(axis=2).mean())


def _headings(dom: str, level: int) -> list[str]:
    found = re.findall(rf"<h{level}[^>]*>(.*?)</h{level}>", dom, flags=re.S)
    return [re.sub(r"<[^>]+>|¶", "", h).strip() for h in found]


def test_the_home_page_and_an_api_page_render_in_chromium(site, tmp_path):
    dom, ink = _rendered(site / "index.html", tmp_path)
    assert _headings(dom, 1) == ["captum_chefer"]
    assert {"Install, and the two commands", "One example per model kind", "Guides"} <= set(_headings(dom, 2))
    assert "A HuggingFace classifier" in _headings(dom, 3)
    assert 'class="md-nav' in dom and "Explain your own model" in dom  # the navigation rendered
    assert ink > 0.05, "the home page rendered (almost) blank"

    dom, ink = _rendered(site / "api" / "attribution.html", tmp_path)
    assert "captum_chefer.attribution" in _headings(dom, 2)
    assert {"CheferAttribution", "attribute"} <= {h.split()[0] for h in _headings(dom, 3) + _headings(dom, 4) if h}
    assert "Gradient-weighted attention relevance" in dom
    assert ink > 0.05, "the API page rendered (almost) blank"

    blank = tmp_path / "blank.html"  # a control: the same measure on a blank page is (near) zero
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    assert _rendered(blank, tmp_path)[1] < 0.001


def test_the_site_folder_is_ignored_by_git():
    assert "site/" in (ROOT / ".gitignore").read_text().splitlines()
    assert re.search(r"^site_dir: site$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
