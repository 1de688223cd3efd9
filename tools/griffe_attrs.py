"""A griffe extension for the docs: attrs classes shown as what they are to a caller.

griffe reads ``prompt: str = attrs.field(validator=...)`` as an attribute whose value is the
``attrs.field(...)`` call, and sees no ``__init__`` (attrs writes it at import time). This
extension, loaded by mkdocstrings (``mkdocs.yml``), gives each field its default as its value
(``= None``, ``= ()``, ``= dict()`` for ``factory=dict``; no value when the field is required)
and each attrs class the ``__init__`` signature attrs generates, keyword-only where the class
says ``kw_only=True``, so the API reference shows every field's type and default. An attribute
set in ``__init__`` (``self.pipeline = pipeline``) shows its annotation, not that assignment.
"""

from __future__ import annotations

from typing import Any

import griffe

#: the class decorators that make an attrs class (as written: ``attrs.frozen(kw_only=True)``)
DECORATORS = {"attrs.frozen", "attrs.define", "attrs.mutable", "attr.s", "attr.attrs"}
FIELDS = {"attrs.field", "attr.ib", "attr.field"}


def _decorator(cls: griffe.Class) -> griffe.Expr | None:
    for decorator in cls.decorators:
        value = decorator.value
        function = value.function if isinstance(value, griffe.ExprCall) else value
        if str(function) in DECORATORS:
            return value if isinstance(value, griffe.Expr) else None
    return None


def _keywords(call: Any) -> dict[str, Any]:
    if not isinstance(call, griffe.ExprCall):
        return {}
    return {arg.name: arg.value for arg in call.arguments if isinstance(arg, griffe.ExprKeyword)}


def _fields(cls: griffe.Class) -> list[griffe.Attribute]:
    found = []
    for member in cls.members.values():
        if not isinstance(member, griffe.Attribute) or member.name.startswith("_"):
            continue
        if member.annotation is None or "ClassVar" in str(member.annotation):
            continue
        if "class-attribute" not in member.labels:
            continue
        found.append(member)
    return found


def _apply(cls: griffe.Class) -> None:
    decorator = _decorator(cls)
    if decorator is None:
        return
    kw_only = str(_keywords(decorator).get("kw_only")) == "True"
    kind = griffe.ParameterKind.keyword_only if kw_only else griffe.ParameterKind.positional_or_keyword
    parameters = [griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)]
    for field in _fields(cls):
        value = field.value
        is_call = isinstance(value, griffe.ExprCall)
        if is_call and str(value.function) in FIELDS:  # type: ignore[union-attr]
            arguments = _keywords(value)
            if "default" in arguments:
                value = arguments["default"]
            elif "factory" in arguments:
                value = griffe.ExprCall(function=arguments["factory"], arguments=[])
            else:
                value = None
            field.value = value
        field.labels.discard("class-attribute")  # a field of each instance, not of the class
        parameters.append(
            griffe.Parameter(
                field.name, annotation=field.annotation, kind=kind, default=value, docstring=field.docstring
            )
        )
    if "__init__" not in cls.members:
        init = griffe.Function(
            "__init__", lineno=0, endlineno=0, parent=cls, parameters=griffe.Parameters(*parameters), returns="None"
        )
        cls.set_member("__init__", init)


def _instance_values(cls: griffe.Class) -> None:
    """``self.pipeline = pipeline`` in ``__init__`` says nothing to a reader: show the attribute's type alone."""
    for member in cls.members.values():
        if isinstance(member, griffe.Attribute) and member.labels == {"instance-attribute"}:
            member.value = None


def _walk(obj: griffe.Module | griffe.Class, seen: set[str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if isinstance(obj, griffe.Class):
        _apply(obj)
        _instance_values(obj)
    for member in obj.members.values():
        if not member.is_alias and (member.is_module or member.is_class):
            _walk(member, seen)  # type: ignore[arg-type]


class AttrsFields(griffe.Extension):
    """Give attrs fields their defaults as values, and attrs classes their ``__init__``."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _walk(pkg, set())
