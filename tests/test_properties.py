"""Properties over the whole request and CLI argument space (Hypothesis).

- Any value in any field either makes a request or raises a t2i error naming that field.
- Any request an engine accepts yields exactly `num_images` images of the requested size, and
  the same request with the same seed yields the same images; anything else is a t2i error.
- Any CLI argument list exits 0 or 2 with one line on stderr, never a traceback.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t2i_core import GenerationRequest, InvalidRequestError, T2IError, load
from t2i_core.cli import main

FIELDS = (
    "prompt",
    "negative_prompt",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "num_images",
    "prompt_weighting",
    "controls",
    "scheduler",
    "options",
)

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.tuples(st.text(max_size=3)),
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), st.integers(), max_size=2),
    st.just(object()),
)


@given(field=st.sampled_from(FIELDS), value=ANY_VALUE)
def test_any_value_in_any_field_is_accepted_or_named(field: str, value: Any) -> None:
    try:
        GenerationRequest(**{"prompt": "a cat", field: value})
    except InvalidRequestError as exc:
        assert exc.field == field or exc.field.startswith(field), (exc.field, field)
        assert repr(value)[:20] in str(exc) or field in str(exc)


# Requests an engine may or may not accept: small sizes and steps keep each image cheap, and
# every scheduler, guidance on and off, negative prompts and several images are in play.
SIZES = st.sampled_from([None, 8, 16, 24, 32, 48, 64, 72])
REQUESTS = st.builds(
    GenerationRequest,
    prompt=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40).filter(
        lambda text: text.strip()
    ),
    negative_prompt=st.one_of(st.none(), st.text(max_size=20)),
    height=SIZES,
    width=SIZES,
    num_inference_steps=st.integers(1, 4),
    guidance_scale=st.one_of(st.none(), st.floats(0, 12, allow_nan=False)),
    seed=st.integers(0, 2**32),
    num_images=st.integers(1, 2),
    scheduler=st.sampled_from(
        [None, "default", "ddim", "ddpm", "euler", "euler-ancestral", "dpm++-2m", "unipc", "lms", "pndm", "bogus"]
    ),
)


@pytest.fixture(scope="module", params=["sd15", "kandinsky22"])
def engine(request: Any) -> Any:
    return load(f"tiny:{request.param}", device="cpu")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=REQUESTS)
def test_an_accepted_request_gives_its_images_and_repeats_exactly(engine: Any, request: GenerationRequest) -> None:
    try:
        resolved, _ = engine.resolve(request)
    except T2IError:
        return  # refused before any work, with a t2i error: allowed
    result = engine.generate(request)
    assert len(result.images) == request.num_images == len(result.seeds)
    assert all(image.size == (resolved.width, resolved.height) for image in result.images)
    assert result.seeds == [result.request.seed + i for i in range(request.num_images)]
    again = engine.generate(request.evolve(seed=result.request.seed))
    assert [image.tobytes() for image in again.images] == [image.tobytes() for image in result.images]


CLI_FLAGS = {
    "--height": st.one_of(st.integers(-100, 200).map(str), st.text(max_size=4)),
    "--width": st.one_of(st.integers(-100, 200).map(str), st.text(max_size=4)),
    "--steps": st.one_of(st.integers(-5, 2000).map(str), st.text(max_size=4)),
    "--guidance-scale": st.one_of(st.floats(allow_nan=True).map(str), st.text(max_size=4)),
    "--seed": st.one_of(st.integers(-5, 2**65).map(str), st.text(max_size=4)),
    "--num-images": st.one_of(st.integers(-2, 3).map(str), st.text(max_size=3)),
    "--scheduler": st.one_of(st.sampled_from(["ddim", "euler", "x", ""]), st.text(max_size=4)),
    "--weighting": st.sampled_from(["compel", "compel-long", "nope", ""]),
    "--option": st.text(max_size=8),
    "--control": st.text(max_size=12),
    "--accelerator": st.sampled_from(["fp32", "sdpa", "nope", "compile", ""]),
    "--device": st.sampled_from(["cpu", "cuda", "cpu:0", "tpu", ""]),
    "--family": st.sampled_from(["sd15", "sdxl", "nope", ""]),
}


def _flags() -> Any:
    return st.dictionaries(st.sampled_from(sorted(CLI_FLAGS)), st.just(None), max_size=3).flatmap(
        lambda chosen: st.fixed_dictionaries({flag: CLI_FLAGS[flag] for flag in chosen})
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=_flags(), prompt=st.text(max_size=12))
def test_any_cli_arguments_end_in_success_or_one_line(
    flags: dict[str, str], prompt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", prompt, "--model", "tiny:sd15", "--steps", "1", "-o", str(tmp_path / "out.png"), "--overwrite"]
    for flag, value in flags.items():
        argv.append(f"{flag}={value}")
    code = main(argv)
    err = capsys.readouterr().err
    if code == 0:
        assert all(line.startswith("t2i: warning: ") for line in err.splitlines()), err
        return
    assert code == 2, (argv, code, err)
    lines = [line for line in err.splitlines() if not line.startswith("t2i: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("t2i: error: "), (argv, err)
    assert "Traceback" not in err


def test_the_seed_bound_holds_for_every_image() -> None:
    from t2i_core.request import MAX_SEED

    with pytest.raises(InvalidRequestError, match="seed"):
        GenerationRequest(prompt="x", seed=MAX_SEED, num_images=2)
    assert math.isfinite(GenerationRequest(prompt="x", seed=MAX_SEED).seed)
