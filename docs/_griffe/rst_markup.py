"""Griffe extension: turn the reStructuredText habits of raylane's docstrings into Markdown for mkdocstrings.

The docstrings are written for ``help()`` and editors as much as for this site, so they use Sphinx roles
(``:func:`raylane.get_strategy```) and ``::`` before an indented example. Markdown has neither; without this they
would render as literal text. A role becomes a link when its target is documented on some page of the site, and plain
code otherwise: the references are optional, so an undocumented target never fails the build.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Module, Object

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`~?\.?(?P<target>[\w.]+)`")
LITERAL_BLOCK_MARKER = re.compile(r"(?<=\S)::$", flags=re.MULTILINE)  # "Subclass it::" introduces a code block


class RstMarkup(Extension):
    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        _convert(obj)

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        _convert(pkg)  # a package's own docstring is not among the objects on_object sees


def _convert(obj: Object) -> None:
    if obj.docstring is None:
        return
    scope = obj.path if obj.is_module or obj.parent is None else obj.parent.path
    text = ROLE.sub(lambda match: _reference(match["target"], scope), obj.docstring.value)
    obj.docstring.value = LITERAL_BLOCK_MARKER.sub(":", text)


def _reference(target: str, scope: str) -> str:
    identifier = target if "." in target else f"{scope}.{target}"  # a bare name means a sibling of the object
    return f'<autoref identifier="{identifier}" optional><code>{target}</code></autoref>'
