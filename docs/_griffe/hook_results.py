"""Griffe extension: label each hook specification with how pluggy combines its implementations' answers.

The label comes from the ``@hookspec(...)`` decorator itself, so the reference page cannot disagree with the code.
"""

from __future__ import annotations

from typing import Any

from griffe import Extension, Function

HOOKSPEC_MODULE = "raylane.hookspecs"


class HookResults(Extension):
    def on_function(self, *, func: Function, **kwargs: Any) -> None:
        if func.module.path != HOOKSPEC_MODULE:
            return
        for decorator in func.decorators:
            text = str(decorator.value)
            if text.startswith("hookspec"):
                func.labels.add("first answer wins" if "firstresult=True" in text else "all implementations run")
