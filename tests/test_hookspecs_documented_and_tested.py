"""Meta-tests: every hook specification is documented in words and exercised by a test that makes raylane call it.

The hooks are the ones pluggy registers from ``raylane.hookspecs``, not names that merely look like hooks. Text is
read with ``ast`` (code only: a docstring or a comment that names a hook proves nothing).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pluggy
import pytest

from raylane import hookspecs
from raylane.host import BackendHost

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PAGE = ROOT / "docs" / "hooks.md"
README = ROOT / "README.md"


def _registered_hooks() -> list[str]:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return sorted(name for name in vars(manager.hook) if not name.startswith("_"))


HOOKS = _registered_hooks()
# The typed facade in front of the plugin manager: BackendHost.<name> calls the hook raylane_<name>.
FACADE = {hook: hook.removeprefix("raylane_") for hook in HOOKS}


def _code_of(pattern: str) -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(), str(path)) for path in ROOT.glob(pattern) if path.is_file()}


TEST_MODULES = {
    path: tree
    for pattern in ("tests/**/test_*.py", "core/tests/**/test_*.py", "backends/*/tests/**/test_*.py")
    for path, tree in _code_of(pattern).items()
    if path.resolve() != Path(__file__).resolve()
}
TEST_PLUGINS = _code_of("tests/plugins/*/src/**/*.py")


def _implementations(tree: ast.Module) -> set[str]:
    """Names of functions and methods marked ``@hookimpl`` (with or without options)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if isinstance(target, (ast.Name, ast.Attribute)) and ast.unparse(target).endswith("hookimpl"):
                    found.add(node.name)
    return found


def _called_attributes(tree: ast.Module) -> set[str]:
    return {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }


def _backends_run(tree: ast.Module) -> set[str]:
    """Backends a module trains with: ``get_strategy("<name>", ...)`` or ``backend = "<name>"`` (conformance)."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("get_strategy")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(node.args[0].value)
        if (
            isinstance(node, ast.Assign)
            and [ast.unparse(target) for target in node.targets] == ["backend"]
            and isinstance(node.value, ast.Constant)
        ):
            names.add(node.value.value)
    return names


def _plugin_backend(path: Path) -> str:
    """The backend name a test plugin registers in its pyproject's ``raylane.backends`` entry points."""
    pyproject = next(parent / "pyproject.toml" for parent in path.parents if (parent / "pyproject.toml").is_file())
    match = re.search(r'\[project\.entry-points\."raylane\.backends"\]\s*\n(\w+)\s*=', pyproject.read_text())
    assert match, f"{pyproject} registers no raylane backend"
    return match.group(1)


def test_the_hook_list_is_what_pluggy_registers() -> None:
    assert "raylane_setup_process_group" in HOOKS and "raylane_reserve_workers" in HOOKS
    assert all(callable(getattr(BackendHost, method, None)) for method in FACADE.values()), "a hook lacks its facade"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_docstring_says_where_it_runs(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert doc.startswith(("*Driver", "*Worker")), f"{hook}'s docstring must say where it runs"
    assert len(doc) > 80, f"{hook} needs a real docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_described_in_words_on_the_reference_page(hook: str) -> None:
    """A row of the page's own table (what a reader sees on GitHub too), not only the generated part."""
    text = REFERENCE_PAGE.read_text().split("\n::: raylane.hookspecs")[0]
    rows = [line for line in text.splitlines() if line.startswith(f"| `{hook}` |")]
    assert len(rows) == 1, f"{REFERENCE_PAGE} needs one table row for {hook}"
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert len(cells) == 5 and all(cells), f"every column of {hook}'s row must say something: {rows[0]}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_in_the_readmes_hook_list(hook: str) -> None:
    hook_list = README.read_text().split("The hooks (all in")[1].split("\n\n")[0]
    assert f"`{hook}`" in hook_list, f"README.md's hook list lacks {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook: str) -> None:
    """A test calls the hook: through the host's facade (or ``pm.hook``) on a test implementation it registers, or by
    training with a test plugin backend that implements it."""
    direct = [
        path
        for path, tree in TEST_MODULES.items()
        if hook in _implementations(tree) and _called_attributes(tree) & {FACADE[hook], hook}
    ]
    plugin_backends = {_plugin_backend(path) for path, tree in TEST_PLUGINS.items() if hook in _implementations(tree)}
    trained = [path for path, tree in TEST_MODULES.items() if _backends_run(tree) & plugin_backends]
    assert direct or trained, f"no test calls {hook} on an implementation of its own"


def test_reference_page_renders_every_hook() -> None:
    """mkdocstrings renders every public member with a docstring, unless the page narrows it down."""
    directive = re.search(r"^::: raylane\.hookspecs\n((?:[ \t]+.*\n)*)", REFERENCE_PAGE.read_text(), re.MULTILINE)
    assert directive, f"{REFERENCE_PAGE} must render raylane.hookspecs (a `::: raylane.hookspecs` line)"
    narrowing = re.findall(r"^\s+(members|filters|show_if_no_docstring):", directive.group(1), re.MULTILINE)
    assert not narrowing, f"{REFERENCE_PAGE} must not narrow down the hooks it renders: drop {narrowing}"
