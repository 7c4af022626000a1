"""mkdocs hook: fills ``{{ flow_families }}`` with one section per registered flow family, taken
from the registry and the families' docstrings, so the flows page can never go stale."""

from __future__ import annotations

import importlib


def _families_markdown() -> str:
    from pyroflows.registry import _FAMILIES, family_spec

    rows = ["| family | vectors | images | conditional | default layers |", "|---|---|---|---|---|"]
    sections = []
    for name, target in _FAMILIES.items():
        spec = family_spec(name)
        yes = {True: "yes", False: "-"}
        rows.append(f"| [`{name}`](#{name}) | {yes[spec.vector]} | {yes[spec.image]} | {yes[spec.conditional]} | {spec.default_layers} |")
        module, builder = target.split(":")
        sections.append(f"## {name}\n\n::: {module}\n    options:\n      show_root_heading: false\n      members: false\n\n::: {module}.{builder}\n")
    return "\n".join(rows) + "\n\n" + "\n".join(sections)


def on_page_markdown(markdown: str, **kwargs) -> str:
    if "{{ flow_families }}" in markdown:
        importlib.invalidate_caches()
        markdown = markdown.replace("{{ flow_families }}", _families_markdown())
    return markdown
