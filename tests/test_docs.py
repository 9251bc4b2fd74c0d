"""The documentation site builds with `mkdocs build --strict`, and has a page for every
public name and every notebook."""

import os
import pathlib
import re
import subprocess
import sys

import diffrax_reversible
import pytest


_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site_dir = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site_dir)],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    return site_dir


def _public_names():
    return sorted(
        name
        for name, value in vars(diffrax_reversible).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("diffrax_reversible")
    )


def test_public_names_are_found():
    # Guards the test below against finding no names at all.
    assert {"Reversible", "ReversibleAdjoint", "check_stability"} <= set(
        _public_names()
    )


def test_every_public_name_has_an_api_entry(site):
    api_html = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    anchors = set(re.findall(r'id="(diffrax_reversible\.[A-Za-z_]+)"', api_html))
    missing = [
        name for name in _public_names() if f"diffrax_reversible.{name}" not in anchors
    ]
    assert not missing, f"no API entry for {missing}"


@pytest.mark.parametrize(
    "notebook", sorted((_ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem
)
def test_every_notebook_has_a_page_with_its_outputs(site, notebook):
    page = site / "examples" / notebook.stem / "index.html"
    assert page.exists(), f"no page for {notebook.name}"
    html = page.read_text()
    title = re.search(r"<h1[^>]*>(.*?)</h1>", html)
    assert title is not None and title.group(1).strip(), "the page has no title"
    # Committed outputs are rendered: figures become images next to the page.
    images = re.findall(r'<img[^>]+src="([^"]+\.png)"', html)
    assert images, f"{notebook.name}: no rendered figure"
    for src in images:
        assert (page.parent / src).resolve().exists(), src


def test_every_page_is_in_the_navigation(site):
    pages = {
        p.relative_to(_ROOT / "docs").as_posix()
        for p in (_ROOT / "docs").rglob("*")
        if p.suffix in (".md", ".ipynb")
    }
    nav = (_ROOT / "mkdocs.yml").read_text()
    assert not [page for page in pages if page not in nav]
