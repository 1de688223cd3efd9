"""The docs stay true: generated tables are current, every page linked exists, every plugin has a page."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from t2i_core import get_registry


def _load_docgen() -> Any:
    """tools/docgen.py, the developer script that writes the generated pages (not shipped in t2i_core)."""
    spec = importlib.util.spec_from_file_location("docgen", Path(__file__).resolve().parents[1] / "tools" / "docgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


docgen = _load_docgen()


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_options_page_is_generated_from_the_declarations() -> None:
    page = DOCS / "families" / "options.md"
    assert page.read_text() == docgen.render_options(), "regenerate: python tools/docgen.py --write"


def test_every_family_has_a_page() -> None:
    # The families t2i ships: a third-party family installed alongside is documented by its plugin.
    families = get_registry().first_party("provider")
    assert {"sd15", "sdxl", "kandinsky22"} <= set(families)
    for name in families:
        assert (DOCS / "families" / f"{name}.md").is_file(), f"docs/families/{name}.md is missing"


def test_every_conditioner_plugin_has_a_page() -> None:
    from t2i_core.registry import FIRST_PARTY

    registry = get_registry()
    shipped = [info for info in registry.plugins.values() if info.source == FIRST_PARTY and not info.error]
    assert {"compel", "controlnet"} <= {info.name for info in shipped}
    for info in shipped:
        if any(item.startswith("conditioner:") for item in info.registered):
            assert (DOCS / "conditioners" / f"{info.name}.md").is_file(), f"docs/conditioners/{info.name}.md is missing"


def test_docs_checks_ignore_third_party_plugins(t2i_registry: Any) -> None:
    """A third-party family or conditioner installed alongside does not make t2i's own docs tests fail."""
    import types

    from t2i_sd15 import StableDiffusion15

    from t2i_core import Conditioner, hookimpl

    class Outsider(StableDiffusion15):
        name = "outsider"
        aliases = {}

    class Whisper(Conditioner):
        name = "whisper"

        def wants(self, request: Any) -> bool:
            return False

    plugin = types.SimpleNamespace(
        register_providers=hookimpl(lambda register: register(Outsider())),
        register_conditioners=hookimpl(lambda register: register(Whisper())),
    )
    t2i_registry.register_plugin(plugin, "outsider")
    assert "outsider" in t2i_registry.providers and "whisper" in t2i_registry.conditioners
    assert "outsider" not in docgen.render_options()
    test_every_family_has_a_page()
    test_every_conditioner_plugin_has_a_page()


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
    cited = re.findall(r"`((?:plugins/\w+/)?tests/[\w/]+\.py)::(\w+)`", page)
    assert len(cited) > 40
    for file, name in cited:
        source = (ROOT / file).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), (
            f"docs/reliability.md cites {file}::{name}, which does not exist"
        )
