"""The docs stay true: generated tables are current, every page linked exists, every plugin has a page."""

from __future__ import annotations

import re
from pathlib import Path

from t2i_core import get_registry
from t2i_core._docgen import render_options

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_options_page_is_generated_from_the_declarations() -> None:
    page = DOCS / "families" / "options.md"
    assert page.read_text() == render_options(), "regenerate: python -m t2i_core._docgen > docs/families/options.md"


def test_every_family_has_a_page() -> None:
    for name in get_registry().providers:
        assert (DOCS / "families" / f"{name}.md").is_file(), f"docs/families/{name}.md is missing"


def test_every_conditioner_plugin_has_a_page() -> None:
    registry = get_registry()
    for info in registry.plugins.values():
        if info.distribution == "t2i-core" or info.error:
            continue
        if any(item.startswith("conditioner:") for item in info.registered):
            assert (DOCS / "conditioners" / f"{info.name}.md").is_file(), f"docs/conditioners/{info.name}.md is missing"


def test_relative_links_resolve() -> None:
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_readme_has_the_three_commands_up_front() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block is not None
    assert block.group(1).strip().splitlines() == [
        "python -m pip install -r requirements-dev.txt",
        't2i generate "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k" --model tiny:sd15 -o astronaut.png',
        "python -m pytest -q",
    ]


def test_reliability_table_names_real_tests() -> None:
    """Every test docs/reliability.md cites exists, so the table cannot drift from the suite."""
    page = (DOCS / "reliability.md").read_text()
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", page)
    assert len(cited) > 40
    for file, name in cited:
        source = (ROOT / file).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"docs/reliability.md cites {file}::{name}, which does not exist"
