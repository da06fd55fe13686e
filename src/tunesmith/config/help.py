"""`tunesmith train --help`: every key, grouped by section, with its type, default and docstring.

The text comes from the sections themselves (`schema.key_docs` reads the docstring under each field),
so the help, the README's reference and the code cannot disagree.
"""

from __future__ import annotations

import dataclasses
import textwrap

from tunesmith.config import schema
from tunesmith.errors import TunesmithError


def format_help(groups: list[tuple[type, str]], only: str | None = None, width: int = 100) -> str:
    """The keys of each (section class, note) group, or of the one section named `only`."""
    if only is not None:
        chosen = [(cls, note) for cls, note in groups if schema.section_name(cls) == only]
        if not chosen:
            names = ", ".join(dict.fromkeys(schema.section_name(cls) for cls, _ in groups))
            raise TunesmithError(f"no config section `{only}`; the sections are {names}.")
        groups = chosen
    return "\n\n".join(_group_text(cls, note, width) for cls, note in groups)


def _shown(field: dataclasses.Field) -> str:
    """A key's default as users write it in YAML (a list as a comma list)."""
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if isinstance(default, list):
        return ", ".join(default)
    return "unset" if default is None else str(default).lower() if isinstance(default, bool) else str(default)


def _group_text(cls: type, note: str, width: int) -> str:
    title = f"[{schema.section_name(cls)}]" + (f" ({note})" if note else "")
    lines = [title, textwrap.indent(textwrap.fill((cls.__doc__ or "").strip(), width - 2), "  ")]
    docs, hints = schema.key_docs(cls), schema.key_types(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for key in schema.own_keys(cls):
        lines.append(f"  {key}: {schema.describe(hints[key])}, default {_shown(fields[key])}")
        lines.append(textwrap.indent(textwrap.fill(docs.get(key, ""), width - 6), "      "))
    return "\n".join(lines)


def reference_table(groups: list[tuple[type, str]]) -> str:
    """The keys as a Markdown table per section (the README's config reference is generated from this)."""
    parts = []
    for cls, note in groups:
        docs, fields = schema.key_docs(cls), {field.name: field for field in dataclasses.fields(cls)}
        rows = [f"| `{key}` | {_shown(fields[key])} | {docs.get(key, '').replace('|', '/')} |"
                for key in schema.own_keys(cls)]
        heading = f"**{schema.section_name(cls)}**" + (f" ({note})" if note else "")
        parts.append("\n".join([heading, "", "| key | default | what |", "|---|---|---|", *rows]))
    return "\n\n".join(parts)
