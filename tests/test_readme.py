"""Every Python code block in README.md and on the docs' front page runs as written.

The blocks of one file run in order in one namespace (a later block may use an earlier one's
names, as a reader following the page would), in a temporary working directory.
"""

import re
from pathlib import Path

import pyro
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "docs" / "index.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```python blocks of a markdown text."""
    return BLOCK.findall(text)


def test_block_extraction():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = a\n"]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    assert blocks, f"no python blocks found in {page.name}"
    monkeypatch.chdir(tmp_path)
    pyro.clear_param_store()
    namespace = {"__name__": f"{page.stem}_blocks"}
    for number, block in enumerate(blocks, 1):
        code = compile(block, f"{page.name}: python block {number}", "exec")
        exec(code, namespace)  # noqa: S102 - running the documentation is the test
