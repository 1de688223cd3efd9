"""GenerationRequest and Control validation: every bad value is an InvalidRequestError naming it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from t2i_core import Control, GenerationRequest, InvalidRequestError, T2IError
from t2i_core.request import MAX_SEED


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("height", 100, "multiple of 8"),
        ("height", 0, "multiple of 8"),
        ("height", -8, "multiple of 8"),
        ("width", 513, "multiple of 8"),
        ("width", 64.0, "multiple of 8"),
        ("num_inference_steps", 0, ">= 1"),
        ("num_inference_steps", 2.5, "integer"),
        ("guidance_scale", -0.5, ">= 0"),
        ("guidance_scale", float("nan"), ">= 0"),
        ("guidance_scale", "7", ">= 0"),
        ("num_images", 0, ">= 1"),
        ("num_images", True, ">= 1"),
        ("seed", -1, "integer in [0"),
        ("seed", MAX_SEED + 1, "integer in [0"),
        ("seed", "42", "integer in [0"),
        ("negative_prompt", 3, "str"),
        ("prompt_weighting", 1, "compel"),
        ("controls", ("not a control",), "Control"),
        ("scheduler", "", "non-empty"),
        ("options", {1: 2}, "mapping"),
    ],
)
def test_bad_field_is_named_with_value_and_allowed(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        GenerationRequest(prompt="a cat", **{field: value})
    error = caught.value
    assert error.field == field
    assert error.value is value or error.value == value or value != value  # NaN
    assert allowed in str(error)
    assert field in str(error) and repr(value) in str(error)
    assert isinstance(error, T2IError) and isinstance(error, ValueError)


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt_is_refused(prompt: str) -> None:
    with pytest.raises(InvalidRequestError, match="prompt.*non-empty"):
        GenerationRequest(prompt=prompt)


def test_prompt_must_be_text() -> None:
    with pytest.raises(InvalidRequestError, match="prompt=None.*str"):
        GenerationRequest(prompt=None)  # type: ignore[arg-type]


def test_seed_plus_batch_must_fit() -> None:
    GenerationRequest(prompt="a", seed=MAX_SEED, num_images=1)
    with pytest.raises(InvalidRequestError, match="seed \\+ num_images"):
        GenerationRequest(prompt="a", seed=MAX_SEED, num_images=2)


def test_request_is_frozen_and_evolve_revalidates() -> None:
    request = GenerationRequest(prompt="a cat", seed=1)
    with pytest.raises(AttributeError):
        request.seed = 2  # type: ignore[misc]
    assert request.evolve(seed=2).seed == 2
    with pytest.raises(InvalidRequestError):
        request.evolve(height=7)


def test_integer_guidance_is_a_float_and_lists_become_tuples() -> None:
    control = Control(image="edges.png", model="tiny:controlnet-sd15")
    request = GenerationRequest(prompt="a", guidance_scale=7, controls=[control])
    assert request.guidance_scale == 7.0 and isinstance(request.guidance_scale, float)
    assert request.controls == (control,)


def test_options_are_read_only() -> None:
    request = GenerationRequest(prompt="a", options={"refiner": "x"})
    with pytest.raises(TypeError):
        request.options["refiner"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scale", -1.0),
        ("scale", "1"),
        ("scale", 1e308),
        ("start", 1.0),
        ("end", 0.0),
        ("model", ""),
        ("image", 3),
        ("image", ""),
    ],
)
def test_bad_control(field: str, value: Any) -> None:
    arguments: dict[str, Any] = {"image": "edges.png", "model": "m", field: value}
    with pytest.raises(InvalidRequestError) as caught:
        Control(**arguments)
    assert caught.value.field == field


def test_control_end_after_start() -> None:
    with pytest.raises(InvalidRequestError, match="end=0.3.*greater than start=0.5"):
        Control(image="a.png", model="m", start=0.5, end=0.3)


@given(
    height=st.integers(1, 4096).map(lambda n: n * 8),
    width=st.integers(1, 4096).map(lambda n: n * 8),
    steps=st.integers(1, 10_000),
    guidance=st.floats(0, 100, allow_nan=False),
    seed=st.integers(0, 2**62),
    count=st.integers(1, 64),
)
def test_valid_values_are_accepted(height: int, width: int, steps: int, guidance: float, seed: int, count: int) -> None:
    request = GenerationRequest(
        prompt="p",
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
        num_images=count,
    )
    assert (request.height, request.width, request.num_inference_steps) == (height, width, steps)


@given(st.integers(-(2**16), 2**16).filter(lambda n: n <= 0 or n % 8))
def test_every_invalid_size_is_refused(size: int) -> None:
    with pytest.raises(InvalidRequestError, match="multiple of 8"):
        GenerationRequest(prompt="p", height=size)


def test_text_must_be_valid_unicode() -> None:
    with pytest.raises(InvalidRequestError, match="prompt=.*valid UTF-8"):
        GenerationRequest(prompt="a cat \udcff")
    with pytest.raises(InvalidRequestError, match="negative_prompt=.*valid UTF-8"):
        GenerationRequest(prompt="a cat", negative_prompt="\udcff")
    assert GenerationRequest(prompt="猫と宇宙飛行士 🚀").prompt == "猫と宇宙飛行士 🚀"


def test_numpy_integers_are_integers() -> None:
    import numpy as np

    request = GenerationRequest(prompt="a", seed=np.int64(5), height=np.int32(64), num_images=np.uint8(2))
    assert (request.seed, request.height, request.num_images) == (5, 64, 2)
    assert type(request.seed) is int
