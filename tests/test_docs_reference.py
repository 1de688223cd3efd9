"""The API reference is complete: every public name and every field of a public class says what it is.

griffe is what mkdocstrings reads, so these checks see the docstrings as the site renders them:
an attribute documents itself with a string literal right after it (a ``#:`` comment does not
render). The site's own build (tests/test_docs_site.py) checks that the fields appear on the page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest

import t2i_core
from t2i_core import kit

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def griffe_package() -> Any:
    import griffe

    return griffe.load("t2i_core", resolve_aliases=True, resolve_external=False)


def _public() -> list[tuple[str, str]]:
    """(module, name) for each name of ``t2i_core.__all__`` and ``t2i_core.kit.__all__``."""
    return [("", name) for name in t2i_core.__all__] + [("kit.", name) for name in kit.__all__]


def _target(package: Any, path: str) -> Any:
    member = package[path]
    return member.final_target if member.is_alias else member


@pytest.mark.parametrize(("module", "name"), _public(), ids=lambda value: value)
def test_every_public_name_and_field_is_documented(griffe_package: Any, module: str, name: str) -> None:
    target = _target(griffe_package, module + name)
    where = f"t2i_core.{module}{name}"
    assert target.docstring and target.docstring.value.strip(), f"{where} has no docstring"
    if not target.is_class:
        return
    for member_name, member in target.members.items():
        if member_name.startswith("_"):
            continue
        member = member.final_target if member.is_alias else member
        if member.is_attribute or member.is_function:
            assert member.docstring and member.docstring.value.strip(), (
                f"{where}.{member_name} has no docstring: write a string literal right after the attribute "
                "(a #: comment does not show in the API reference)"
            )


def _attrs_classes() -> list[type]:
    found = []
    for name in [*t2i_core.__all__]:
        value = getattr(t2i_core, name)
        if isinstance(value, type) and attrs.has(value):
            found.append(value)
    return found


def test_attrs_classes_are_the_ones_the_reference_shows() -> None:
    """The request values and the plugin values are attrs classes: the checks above cover their fields."""
    names = {cls.__name__ for cls in _attrs_classes()}
    assert {"GenerationRequest", "GenerationResult", "Control", "Lora", "Embedding", "FamilyDefaults"} <= names
    for cls in _attrs_classes():
        assert attrs.fields(cls), cls


def test_the_fields_docstrings_name_the_real_defaults(griffe_package: Any) -> None:
    """A field's docstring that states a default (``default 1.0``) states the one attrs applies."""
    for cls in _attrs_classes():
        target = _target(griffe_package, cls.__name__)
        for field in attrs.fields(cls):
            text = target.members[field.name].docstring.value
            stated = re.search(r"[Dd]efault (-?\d+(?:\.\d+)?)\b", text)
            if stated is None or field.default is attrs.NOTHING:
                continue
            assert float(stated[1]) == float(field.default), (
                f"t2i_core.{cls.__name__}.{field.name}: the docstring says default {stated[1]}, "
                f"attrs applies {field.default!r}"
            )


def test_the_griffe_extension_gives_attrs_classes_their_signature() -> None:
    """tools/griffe_attrs.py (loaded by mkdocs.yml) turns ``attrs.field(default=...)`` into the default."""
    import griffe

    package = griffe.load(
        "t2i_core",
        resolve_aliases=True,
        resolve_external=False,
        extensions=griffe.load_extensions(str(ROOT / "tools" / "griffe_attrs.py")),
    )
    request = _target(package, "GenerationRequest")
    parameters = {parameter.name: parameter for parameter in request.members["__init__"].parameters}
    for field in attrs.fields(t2i_core.GenerationRequest):
        parameter = parameters[field.name]
        assert parameter.kind is griffe.ParameterKind.keyword_only
        if field.default is attrs.NOTHING:
            assert parameter.default is None, field.name
        elif isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            factory = field.default.factory  # type: ignore[union-attr]
            assert str(parameter.default) == f"{factory.__name__}()", field.name
        else:
            assert str(parameter.default) == repr(field.default), field.name
    assert "attrs.field" not in str(request.members["height"].value)
    assert "tools/griffe_attrs.py" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


def test_links_in_docstrings_lead_to_pages(griffe_package: Any) -> None:
    """A docstring's link (``[Concepts](../concepts.md)``) is relative to docs/reference/, where it renders.

    mkdocs does not check links inside rendered docstrings, so this test does.
    """
    reference = ROOT / "docs" / "reference"
    checked = 0
    for module, name in _public():
        target = _target(griffe_package, module + name)
        members = (
            [target, *(m for n, m in target.members.items() if not n.startswith("_"))] if target.is_class else [target]
        )
        for member in members:
            member = member.final_target if member.is_alias else member
            text = member.docstring.value if member.docstring else ""
            for link in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
                checked += 1
                assert (reference / link).resolve().is_file(), f"t2i_core.{module}{name}: the link {link} leads nowhere"
    assert checked >= 3
