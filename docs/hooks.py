"""mkdocs hooks for the pyroflows site.

- ``{{ flow_families }}`` on a page becomes one section per registered flow family, taken from
  the registry and the families' docstrings, so the flows page can never go stale.
- Every executed notebook in ``tutorials/`` becomes a page ``tutorials/<name>.md`` with its
  figures as PNG files beside it: markdown cells as written, code cells as Python blocks, and
  each cell's stdout, tables and figures as they were when the notebook was committed (stderr,
  such as progress bars and log lines, is left out). Nothing is executed at build time, so the
  build stays fast; ``tests/test_tutorials.py`` runs the notebooks.
"""

from __future__ import annotations

import base64
import importlib
import json
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _families_markdown() -> str:
    from pyroflows.registry import _FAMILIES, family_spec

    rows = ["| family | vectors | images | conditional | default layers |", "|---|---|---|---|---|"]
    sections = []
    yes = {True: "yes", False: "-"}
    for name, target in _FAMILIES.items():
        spec = family_spec(name)
        rows.append(
            f"| [`{name}`](#{name}) | {yes[spec.vector]} | {yes[spec.image]} | "
            f"{yes[spec.conditional]} | {spec.default_layers} |"
        )
        module, builder = target.split(":")
        sections.append(
            f"## {name}\n\n::: {module}\n    options:\n      show_root_heading: false\n"
            f"      members: false\n\n::: {module}.{builder}\n"
        )
    return "\n".join(rows) + "\n\n" + "\n".join(sections)


def _text(value: str | list[str]) -> str:
    return value if isinstance(value, str) else "".join(value)


def _fenced(text: str, language: str = "text") -> str:
    text = _ANSI.sub("", text).rstrip("\n")
    fence = "````" if "```" in text else "```"
    return f"{fence}{language}\n{text}\n{fence}\n"


def _site_links(markdown: str) -> str:
    # links written for the repository (tutorials/ beside docs/) point into the site instead
    markdown = re.sub(r"\]\(\.\./docs/", "](../", markdown)
    return re.sub(r"\]\(([\w-]+)\.ipynb\)", r"](\1.md)", markdown)


def notebook_markdown(notebook: dict[str, Any], stem: str) -> tuple[str, dict[str, bytes]]:
    """A notebook as markdown, and its figures as ``{file name: PNG bytes}``.

    Args:
        notebook: the parsed ``.ipynb`` JSON.
        stem: the notebook's name, used to name its figure files (``<stem>-<n>.png``).

    Returns:
        the page's markdown and the images it links to (relative to the page's folder).
    """
    parts, images = [], {}
    for cell in notebook["cells"]:
        source = _text(cell.get("source", "")).strip("\n")
        if cell["cell_type"] == "markdown":
            parts.append(_site_links(source) + "\n")
            continue
        if cell["cell_type"] != "code" or not source:
            continue
        parts.append(_fenced(source, "python"))
        for output in cell.get("outputs", []):
            kind = output["output_type"]
            if kind == "stream":
                if output.get("name") == "stdout":
                    parts.append(_fenced(_text(output["text"])))
            elif kind == "error":
                parts.append(_fenced(f"{output['ename']}: {output['evalue']}"))
            else:
                data = output.get("data", {})
                if "image/png" in data:
                    name = f"{stem}-{len(images) + 1}.png"
                    images[name] = base64.b64decode(_text(data["image/png"]))
                    parts.append(f"![output {len(images)}]({name})\n")
                elif "text/markdown" in data:
                    parts.append(_text(data["text/markdown"]) + "\n")
                elif "text/html" in data:
                    parts.append('<div class="nb-output">\n'
                                 + _text(data["text/html"]) + "\n</div>\n")
                elif "text/plain" in data:
                    parts.append(_fenced(_text(data["text/plain"])))
    header = (
        f"!!! note \"Executed notebook\"\n    Generated from `tutorials/{stem}.ipynb` with the "
        "outputs it was committed with; run it yourself with `jupyter lab tutorials/`.\n"
    )
    title, _, body = "\n".join(parts).partition("\n")
    return f"{title}\n\n{header}\n{body}", images


def on_files(files: Files, config: Any) -> Files:
    """Add one generated page (and its figures) per tutorial notebook."""
    for path in sorted(TUTORIALS.glob("*.ipynb")):
        markdown, images = notebook_markdown(json.loads(path.read_text()), path.stem)
        files.append(File.generated(config, f"tutorials/{path.stem}.md", content=markdown))
        for name, png in images.items():
            files.append(File.generated(config, f"tutorials/{name}", content=png))
    return files


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Expand ``{{ flow_families }}``."""
    if "{{ flow_families }}" in markdown:
        importlib.invalidate_caches()
        markdown = markdown.replace("{{ flow_families }}", _families_markdown())
    return markdown
