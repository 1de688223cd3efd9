"""attrs validators whose failures are `InvalidRequestError`s naming the field, value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from .errors import InvalidRequestError

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def of_type(*types: type, what: str | None = None) -> Validator:
    """Like `attrs.validators.instance_of`, but never lets a bool pass as a number."""

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) and bool not in types:
            raise InvalidRequestError(attribute.name, value, what or _type_name(types))
        if not isinstance(value, types):
            raise InvalidRequestError(attribute.name, value, what or _type_name(types))

    return check


def optional(validator: Validator) -> Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            validator(inst, attribute, value)

    return check


def in_range(low: float | None = None, high: float | None = None, *, what: str) -> Validator:
    """Check `low <= value <= high` (and that a float is finite)."""

    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(attribute.name, value, what)
        if (low is not None and value < low) or (high is not None and value > high):
            raise InvalidRequestError(attribute.name, value, what)

    return check


def multiple_of(step: int) -> Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value <= 0 or value % step:
            raise InvalidRequestError(attribute.name, value, f"a positive multiple of {step}")

    return check


def non_blank(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not value.strip():
        raise InvalidRequestError(attribute.name, value, "a non-empty text")


def encodable(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """Text a tokenizer can read: valid Unicode (no lone surrogates from undecodable bytes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(attribute.name, value, "valid UTF-8 text") from None


def to_int(value: Any) -> Any:
    """Accept any integral number (numpy integers included) as an int; leave the rest to validators."""
    import numbers

    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def chain(*validators: Validator) -> Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        for validator in validators:
            validator(inst, attribute, value)

    return check
