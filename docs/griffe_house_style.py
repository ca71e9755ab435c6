"""A griffe extension that reads this project's docstrings as mkdocstrings' Google parser expects.

The source keeps its house style (``Example:`` sections with doctests, Sphinx roles such as
``:func:`~lightning_memopt.optim.apollo_param_groups```, and ``a, b, c: ...`` for parameters
that share one description); this rewrites each docstring before it is parsed, so that the
API reference renders doctests as code, roles as code spans, and one entry per parameter.
Loaded by ``mkdocs.yml`` (``extensions:``); nothing in the package imports it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# "Example:" is not one of the section titles the Google parser knows; "Examples:" is.
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
# :func:`~pkg.mod.name` -> `name`; :class:`pkg.Name` -> `pkg.Name`.
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")
_SECTION = re.compile(r"^(\s*)(\w[\w ]*):\s*$")
_SHARED_ITEM = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):(\s.*)?$")
_PARAMETER_SECTIONS = {"args", "arguments", "params", "parameters", "attributes", "keyword args"}


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


def _split_shared_items(text: str) -> str:
    """``a, b: description`` in a parameter section -> one item per name, same description."""
    lines = text.splitlines()
    out: list[str] = []
    in_params = False
    i = 0
    while i < len(lines):
        line = lines[i]
        section = _SECTION.match(line)
        if section and section.group(2).lower() in _PARAMETER_SECTIONS:
            in_params = True
        elif section or (line.strip() and not line.startswith((" ", "\t"))):
            in_params = False
        item = _SHARED_ITEM.match(line) if in_params else None
        if not item:
            out.append(line)
            i += 1
            continue
        indent, names, rest = item.group(1), item.group(2), item.group(3) or ""
        body = [rest]
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append("\n" + lines[i])
            i += 1
        for name in (n.strip() for n in names.split(",")):
            out.append(f"{indent}{name}:{''.join(body)}")
    return "\n".join(out)


class HouseStyleDocstrings(griffe.Extension):
    """Rewrite each docstring once, when its object is loaded (before it is parsed)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
        text = _ROLE.sub(_role, text)
        obj.docstring.value = _split_shared_items(text)
