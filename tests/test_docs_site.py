"""The docs site: it builds strictly, and its reference pages cover the code (generated, or checked)."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import t2i_core
from t2i_core import hookspecs


def _load_docgen() -> Any:
    """tools/docgen.py, the developer script that writes the generated pages (not shipped in t2i_core)."""
    spec = importlib.util.spec_from_file_location("docgen", Path(__file__).resolve().parents[1] / "tools" / "docgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docgen = _load_docgen()
PAGES = docgen.PAGES
render_accelerators = docgen.render_accelerators
render_cli = docgen.render_cli


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """A broken link or anchor, a nav entry without its page, a docstring mkdocstrings cannot render."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    problems = [line for line in done.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert done.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or [done.stderr[-3000:]])
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    # The data model shows on the page: each field of each attrs class, and the engine's attributes.
    import attrs

    for name in t2i_core.__all__:
        value = getattr(t2i_core, name)
        fields = [f.name for f in attrs.fields(value)] if isinstance(value, type) and attrs.has(value) else []
        for field in fields:
            assert f'id="t2i_core.{name}.{field}"' in api, f"the API reference does not show {name}.{field}"
    for attribute in ("pipeline", "max_pixels", "model", "family", "device", "accelerators", "state"):
        assert f'id="t2i_core.Engine.{attribute}"' in api, f"the API reference does not show Engine.{attribute}"
    assert "attrs.field(" not in api, "a field shows attrs.field(...) instead of its default (tools/griffe_attrs.py)"


def test_cli_page_is_generated_from_the_parser() -> None:
    page = DOCS / "reference" / "cli.md"
    assert page.read_text(encoding="utf-8") == render_cli(), "regenerate: python tools/docgen.py --write"


def test_accelerator_page_is_generated_from_the_registry() -> None:
    page = DOCS / "reference" / "accelerators.md"
    assert page.read_text(encoding="utf-8") == render_accelerators(), "regenerate: python tools/docgen.py --write"


def test_every_generated_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in PAGES:
        assert f": {page}" in nav, f"mkdocs.yml: {page} is generated but not in the nav"


def test_every_public_name_has_a_docstring_and_is_in_the_api_reference() -> None:
    """What mkdocstrings renders: griffe's view of each name of ``t2i_core.__all__``, and of their methods."""
    import griffe

    module = griffe.load("t2i_core", resolve_aliases=True, resolve_external=False)
    page = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    for name in t2i_core.__all__:
        assert f"::: t2i_core.{name}\n" in page, (
            f"docs/reference/api.md has no section for {name} (::: t2i_core.{name})"
        )
        member = module[name]
        target = member.final_target if member.is_alias else member
        assert target.docstring and target.docstring.value.strip(), f"t2i_core.{name} has no docstring"
        if not target.is_class:
            continue
        for method_name, method in target.members.items():
            method = method.final_target if method.is_alias else method
            if method_name.startswith("_") or not method.is_function:
                continue
            assert method.docstring and method.docstring.value.strip(), (
                f"t2i_core.{name}.{method_name} has no docstring"
            )


def test_api_reference_documents_nothing_private() -> None:
    page = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    documented = re.findall(r"^::: t2i_core\.(\w+)$", page, re.M)
    assert sorted(documented) == sorted(t2i_core.__all__)


def _hooks() -> list[str]:
    return [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def test_every_hook_has_a_reference_section_and_an_example() -> None:
    page = (DOCS / "reference" / "hooks.md").read_text(encoding="utf-8")
    sections = re.split(r"^::: ", page, flags=re.M)[1:]
    documented = {section.split()[0]: section for section in sections}
    for name in _hooks():
        section = documented.get(f"t2i_core.hookspecs.{name}")
        assert section is not None, f"docs/reference/hooks.md has no section for the hook {name}"
        first = next(iter(inspect.signature(getattr(hookspecs, name)).parameters))  # register, or cli
        assert "```python\n" in section and f"def {name}({first}" in section, f"hook {name} has no example"


def _read_variables() -> set[str]:
    """Every environment variable t2i's code names: T2I_*, and the HF_/TORCHINDUCTOR_/... ones it reads or sets."""
    found: set[str] = set()
    sources = [*(ROOT / "t2i_core").rglob("*.py"), *(ROOT / "plugins").glob("*/t2i_*/**/*.py")]
    for source in sources:
        text = source.read_text(encoding="utf-8")
        found |= set(re.findall(r"[\"'](T2I_[A-Z0-9_]+)[\"']", text))
        found |= set(re.findall(r"[\"']((?:HF|TORCHINDUCTOR|XDG)_[A-Z0-9_]+|[A-Z]+_VERBOSITY)[\"']", text))
    return found


def test_every_environment_variable_is_documented() -> None:
    page = (DOCS / "environment.md").read_text(encoding="utf-8")
    variables = _read_variables()
    assert {"T2I_CACHE", "T2I_LOAD_PLUGINS", "HF_HUB_OFFLINE"} <= variables
    for variable in sorted(variables):
        assert f"`{variable}`" in page, f"docs/environment.md does not list {variable}, which the code reads or sets"


def test_every_generate_flag_is_in_the_command_line_guide() -> None:
    """docs/cli.md explains each flag (the reference page is generated; this guide is written by hand)."""
    from t2i_core import get_registry
    from t2i_core.cli.main import build_parser

    parser = build_parser(get_registry().commands)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    guide = (DOCS / "cli.md").read_text(encoding="utf-8")
    for action in commands["generate"]._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        assert f"`{action.option_strings[0]}" in guide, f"docs/cli.md does not explain {action.option_strings[0]}"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_generated_pages_say_they_are_generated(page: str) -> None:
    assert "<!-- Generated by `python tools/docgen.py" in (DOCS / page).read_text(encoding="utf-8")
