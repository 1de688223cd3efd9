"""Family options: typed, bounded, finite; text from the command line is converted."""

from __future__ import annotations

from typing import Any

import pytest

from t2i_core import InvalidRequestError, Option

STRENGTH = Option(name="strength", type=float, default=0.8, minimum=0.0, maximum=1.0, help="how strong")
STEPS = Option(name="steps", type=int, default=None, minimum=1, help="how many")
SIZE = Option(name="size", type=int, default=None, minimum=1, length=2, help="height, width")
FLAG = Option(name="flag", type=bool, default=False, help="on or off")
MODE = Option(name="mode", type=str, default="a", choices=("a", "b"), help="which")


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        (STRENGTH, "0.5", 0.5),
        (STRENGTH, 1, 1.0),
        (STEPS, "7", 7),
        (STEPS, None, None),
        (SIZE, "512,768", (512, 768)),
        (SIZE, (64, 32), (64, 32)),
        (FLAG, "yes", True),
        (FLAG, "0", False),
        (MODE, "b", "b"),
    ],
)
def test_accepted(option: Option, value: Any, expected: Any) -> None:
    assert option.coerce(value) == expected


@pytest.mark.parametrize(
    ("option", "value"),
    [
        (STRENGTH, "nan"),
        (STRENGTH, float("inf")),
        (STRENGTH, "-inf"),
        (STRENGTH, 1.5),
        (STRENGTH, "strong"),
        (STRENGTH, True),
        (STEPS, 0),
        (STEPS, "2.5"),
        (SIZE, "512"),
        (SIZE, "512,x"),
        (FLAG, "maybe"),
        (MODE, "c"),
    ],
)
def test_refused_with_field_value_and_allowed(option: Option, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        option.coerce(value)
    assert caught.value.field == f"options[{option.name!r}]"
    assert caught.value.allowed == option.describe()
    assert repr(value) in str(caught.value)
