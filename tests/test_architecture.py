"""The shape of the house (docs/architecture.md): no import cycle in t2i_core, small modules, and
plugins that use only the public modules a third party may rely on."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "t2i_core"
#: What a plugin may import of t2i (CONTRACT.md): the facade, the kit, the test kit, tiny builds.
PUBLIC = ("t2i_core", "t2i_core.kit", "t2i_core.testing", "t2i_core.tiny")
#: The most lines a t2i_core module should have: past it, a module hides several concerns.
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _core_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(CORE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, *, type_only: bool) -> Iterator[tuple[str, list[str]]]:
    """Every import in `path` as (absolute module, names), function-local ones included; type-only ones
    (under ``if TYPE_CHECKING:``) only when `type_only`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> Iterator[tuple[str, list[str]]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not type_only:
                for other in child.orelse:
                    yield from visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, []
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    module = child.module or ""
                yield module, [alias.name for alias in child.names]
            yield from visit(child)

    yield from visit(ast.parse(path.read_text(encoding="utf-8")))


def _lazy_exports(path: Path) -> list[str]:
    """The modules a module's ``_EXPORTS`` table (PEP 562: name -> module, or (module, name), relative
    to its package) imports on first use."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        target: ast.expr
        value: ast.expr | None
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "_EXPORTS" and value is not None:
            table = ast.literal_eval(value)
            modules = {each if isinstance(each, str) else each[0] for each in table.values()}
            return sorted(f"{package}.{module}" for module in modules)
    return []


def import_graph() -> dict[str, set[str]]:
    modules = _core_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        targets: list[str] = []
        for module, names in _imports(path, type_only=False):
            candidates = [f"{module}.{each}" for each in names if f"{module}.{each}" in modules]
            targets.extend(candidates or [module])
        targets.extend(_lazy_exports(path))
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_t2i_core_has_no_import_cycle() -> None:
    """Function-local imports count: low layers never import high ones, not even inside a function."""
    graph = import_graph()
    assert graph["t2i_core.engine.loading"], "the graph builder found no imports: it is broken"
    assert (
        "t2i_core.registry" in graph["t2i_core.engine.run"] or "t2i_core.registry" in graph["t2i_core.engine.loading"]
    )
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_too_long() -> None:
    long = {
        name: lines
        for name, path in _core_modules().items()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}, f"split these modules (over {MAX_LINES} lines): {long}"


def _plugin_files() -> list[Path]:
    files = [path for path in sorted((ROOT / "plugins").glob("*/t2i_*/**/*.py"))]
    files += sorted((ROOT / "docs" / "examples").glob("*/**/*.py"))
    return files


@pytest.mark.parametrize("path", _plugin_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_plugins_import_only_the_public_modules(path: Path) -> None:
    """Shipped plugins and the tutorial's example import t2i as a third party would, type-only imports included."""
    private = sorted(
        f"{module}{'' if not names else ' (' + ', '.join(names) + ')'}"
        for module, names in _imports(path, type_only=True)
        if (module == "t2i_core" or module.startswith("t2i_core.")) and module not in PUBLIC
        if not (module == "t2i_core" or any(module.startswith(f"{public}.") for public in PUBLIC[2:]))
    )
    facade_modules = sorted(
        f"t2i_core.{name}"
        for module, names in _imports(path, type_only=True)
        if module == "t2i_core"
        for name in names
        if (CORE / name).with_suffix(".py").is_file() or (CORE / name).is_dir()
        if f"t2i_core.{name}" not in PUBLIC
    )
    assert private + facade_modules == []


def test_import_t2i_core_imports_only_what_it_needs() -> None:
    """``import t2i_core`` loads no submodule; a name loads its own module (PEP 562), never torch."""
    code = (
        "import sys, t2i_core\n"
        "before = sorted(m for m in sys.modules if m.startswith('t2i_core.'))\n"
        "t2i_core.GenerationRequest\n"
        "after = sorted(m for m in sys.modules if m.startswith('t2i_core.'))\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print(before, 't2i_core.request' in after, heavy, len(after) < 8)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True [] True"


#: What ``t2i --help`` and ``t2i plugins`` never import: what a command or a plugin needs only when it
#: runs (issue #16: both stay near-instant; benchmarks/bench_startup.py times them).
NOT_AT_STARTUP = (
    "torch",
    "diffusers",
    "transformers",
    "t2i_core.engine",
    "t2i_core.request",
    "t2i_core.batch.driver",
    "t2i_core.batch.jobs",
    "t2i_core.batch.worker",
    "t2i_core.tiny.configs",
    "t2i_core.tiny.tokenizers",
    "t2i_core._files",
    "t2i_core._weight_files",
    "t2i_core.cli.flags",
    "t2i_core.cli.outputs",
    "t2i_core.cli.rerun",
    "t2i_core.cli.template",
)


@pytest.mark.parametrize("command", ["--help", "plugins"])
def test_help_and_plugins_import_only_what_registration_needs(command: str) -> None:
    """Every plugin loads, but a command's implementation, the batch machinery and tiny builds do not."""
    code = (
        "import contextlib, io, sys\n"
        "from t2i_core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    status = main(sys.argv[1:])\n"
        "print(status, *sorted(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, check=True).stdout
    status, *loaded = out.split()
    assert status == "0"
    assert "t2i_core.builtins.accelerators" in loaded and "t2i_core.cli.generate" in loaded  # what registers
    assert sorted(set(NOT_AT_STARTUP).intersection(loaded)) == []


def test_the_kit_and_tiny_load_a_helper_only_when_asked_for_it() -> None:
    """``t2i_core.kit`` and ``t2i_core.tiny`` are facades (PEP 562): a plugin importing one name pays for its module only."""
    code = (
        "import sys\n"
        "from t2i_core.kit import has_variant\n"
        "from t2i_core.tiny import TINY_PREFIX\n"
        "print(*sorted(m for m in sys.modules if m.startswith('t2i_core')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.split())
    assert {"t2i_core._hub", "t2i_core.tiny.cache"} <= loaded
    assert sorted(loaded & {"t2i_core._files", "t2i_core._weight_files", "t2i_core.schedulers", *NOT_AT_STARTUP}) == []


def test_every_public_name_resolves() -> None:
    import t2i_core

    for name in t2i_core.__all__:
        assert getattr(t2i_core, name) is not None, name
    with pytest.raises(AttributeError):
        t2i_core.no_such_name  # noqa: B018
