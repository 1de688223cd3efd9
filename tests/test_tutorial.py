"""The provider tutorial stays true to its finished example, which the suite installs and tests.

A code block marked ``<!-- docs-test: excerpt: PATH -->`` must appear, line for line,
in the file at PATH, so docs/tutorial-provider.md cannot drift from docs/examples/t2i-pixart-sigma.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXCERPT = re.compile(
    r"^<!--\s*docs-test:\s*excerpt:\s*(?P<path>\S+)\s*-->\s*\n```[\w-]*\n(?P<code>.*?)^```", re.M | re.S
)
PAGES = [ROOT / "docs" / "tutorial-provider.md", ROOT / "docs" / "testing.md"]


def excerpts() -> list[tuple[str, str, str]]:
    found = []
    for page in PAGES:
        for match in EXCERPT.finditer(page.read_text(encoding="utf-8")):
            found.append((page.name, match["path"], match["code"]))
    return found


def test_the_tutorial_quotes_its_example() -> None:
    quoted = {path for _, path, _ in excerpts()}
    assert {
        "docs/examples/t2i-pixart-sigma/pyproject.toml",
        "docs/examples/t2i-pixart-sigma/t2i_pixart_sigma/__init__.py",
        "docs/examples/t2i-pixart-sigma/tests/test_t2i_pixart_sigma.py",
    } <= quoted


@pytest.mark.parametrize(("page", "path", "code"), excerpts(), ids=lambda value: str(value)[:40])
def test_every_excerpt_is_in_its_file(page: str, path: str, code: str) -> None:
    source = (ROOT / path).read_text(encoding="utf-8")
    assert code in source, f"{page}: an excerpt of {path} is no longer in that file:\n{code}"


def test_the_example_is_installed_and_its_tests_are_in_the_suite() -> None:
    """CI installs the example (requirements-dev.txt) and runs its tests (pytest testpaths)."""
    from importlib import metadata

    assert metadata.distribution("t2i-pixart-sigma").version == "0.1.0"
    assert "-e docs/examples/t2i-pixart-sigma" in (ROOT / "requirements-dev.txt").read_text().splitlines()
    import fnmatch

    import tomllib

    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    assert any(fnmatch.fnmatch("docs/examples/t2i-pixart-sigma/tests", path) for path in testpaths), testpaths
