"""The docs site: every page and tutorial is in the navigation, notebooks render to pages with
their figures, and docstrings use mkdocs cross-references rather than Sphinx roles.

The strict build itself (`mkdocs build --strict`) runs in `.ci/run`, not here (it takes a while).
"""

import base64
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
NAV_ENTRY = re.compile(r"^\s*- (?:[^:\n]+: )?([\w/.-]+\.md)\s*$", re.MULTILINE)


def nav_pages() -> list[str]:
    """The markdown paths listed in mkdocs.yml's navigation."""
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text[text.index("\nnav:") : text.index("\ntheme:")]
    return NAV_ENTRY.findall(nav)


def load_hooks():
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_page_and_tutorial_is_in_the_navigation():
    pages = nav_pages()
    assert len(pages) == len(set(pages)), "a page is listed twice"
    written = {p.relative_to(DOCS).as_posix() for p in DOCS.glob("*.md")}
    generated = {f"tutorials/{nb.stem}.md" for nb in NOTEBOOKS}
    assert set(pages) == written | generated


def test_notebook_becomes_a_page_with_its_figures():
    hooks = load_hooks()
    png = b"\x89PNG\r\n\x1a\n fake"
    notebook = {"cells": [
        {"cell_type": "markdown", "source": ["# Title\n", "See [bench](../docs/benchmarks.md) "
                                             "and [the MCMC one](mcmc.ipynb)."]},
        {"cell_type": "code", "source": "print(1)", "outputs": [
            {"output_type": "stream", "name": "stdout", "text": ["1\n"]},
            {"output_type": "stream", "name": "stderr", "text": ["100%|#####| progress\n"]},
            {"output_type": "display_data",
             "data": {"image/png": base64.b64encode(png).decode(), "text/plain": ["<Figure>"]}},
        ]},
        {"cell_type": "code", "source": "", "outputs": []},
    ]}
    markdown, images = hooks.notebook_markdown(notebook, "demo")
    assert markdown.startswith("# Title\n")
    assert "```python\nprint(1)\n```" in markdown and "```text\n1\n```" in markdown
    assert "progress" not in markdown and "<Figure>" not in markdown
    assert images == {"demo-1.png": png} and "](demo-1.png)" in markdown
    assert "](../benchmarks.md)" in markdown and "](mcmc.md)" in markdown


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_tutorials_are_executed_and_render(path):
    notebook = json.loads(path.read_text())
    markdown, _ = load_hooks().notebook_markdown(notebook, path.stem)
    assert markdown.startswith("# "), f"{path.name} does not start with a title"
    code = [c for c in notebook["cells"] if c["cell_type"] == "code" and c.get("source")]
    assert any(c.get("outputs") for c in code), f"{path.name} is committed without outputs"


SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|ref):`")


def test_no_sphinx_roles():
    """mkdocs renders Sphinx roles as raw text: cross-references are `[text][identifier]`."""
    files = [*ROOT.glob("pyroflows/**/*.py"), *DOCS.glob("*.md"), ROOT / "README.md",
             *ROOT.glob("benchmarks/*.py"), *NOTEBOOKS]
    found = [f"{path.relative_to(ROOT)}:{number}"
             for path in files
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if SPHINX_ROLE.search(line)]
    assert not found, f"Sphinx roles left: {found}"
