"""The SDK's SD1.5 images equal raw diffusers' bit for bit (CONTRACT.md, reproducibility)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from t2i_core import GenerationRequest
from t2i_core.testing import as_array, assert_images_equal, cpu_generators

STEPS = 3
PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"


def raw(pipeline: Any, seed: int, count: int = 1, **kwargs: Any) -> list[Any]:
    kwargs.setdefault("num_inference_steps", STEPS)
    return list(pipeline(generator=cpu_generators(seed, count), num_images_per_prompt=count, **kwargs).images)


def test_plain_prompt(sd15_engine: Any, raw_sd15: Any) -> None:
    result = sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=31, num_inference_steps=STEPS))
    assert result.seeds == [31]
    assert_images_equal(result.images, raw(raw_sd15, 31, prompt=PROMPT))


def test_family_defaults_fill_the_request(sd15_engine: Any, raw_sd15: Any) -> None:
    result = sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=5, num_inference_steps=STEPS))
    assert result.request.guidance_scale == 7.5
    assert (result.request.height, result.request.width) == (64, 64)  # the tiny checkpoint's native size
    # And the defaults are the pipeline's own: raw diffusers called without them gives the same image.
    assert_images_equal(result.images, raw(raw_sd15, 5, prompt=PROMPT))


def test_negative_prompt(sd15_engine: Any, raw_sd15: Any) -> None:
    request = GenerationRequest(prompt=PROMPT, negative_prompt="ugly, deformed", seed=7, num_inference_steps=STEPS)
    result = sd15_engine.generate(request)
    assert_images_equal(result.images, raw(raw_sd15, 7, prompt=PROMPT, negative_prompt="ugly, deformed"))
    plain = sd15_engine.generate(request.evolve(negative_prompt=None))
    assert not np.array_equal(as_array(plain.images[0]), as_array(result.images[0]))


def test_guidance_scale_and_non_square_size(sd15_engine: Any, raw_sd15: Any) -> None:
    request = GenerationRequest(
        prompt=PROMPT, guidance_scale=3.0, height=48, width=80, seed=11, num_inference_steps=STEPS
    )
    result = sd15_engine.generate(request)
    assert result.images[0].size == (80, 48)
    assert_images_equal(result.images, raw(raw_sd15, 11, prompt=PROMPT, guidance_scale=3.0, height=48, width=80))


def test_no_guidance(sd15_engine: Any, raw_sd15: Any) -> None:
    result = sd15_engine.generate(GenerationRequest(prompt=PROMPT, guidance_scale=0.0, seed=3, num_inference_steps=2))
    assert_images_equal(result.images, raw(raw_sd15, 3, prompt=PROMPT, guidance_scale=0.0, num_inference_steps=2))


def test_random_seed_is_reported_and_reproduces(sd15_engine: Any, raw_sd15: Any) -> None:
    first = sd15_engine.generate(GenerationRequest(prompt=PROMPT, num_inference_steps=STEPS))
    (seed,) = first.seeds
    assert first.request.seed == seed
    assert_images_equal(first.images, raw(raw_sd15, seed, prompt=PROMPT))
    again = sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=seed, num_inference_steps=STEPS))
    assert_images_equal(again.images, first.images)


def test_two_images_match_batched_call_and_lone_runs(sd15_engine: Any, raw_sd15: Any) -> None:
    result = sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=100, num_images=2, num_inference_steps=STEPS))
    assert result.seeds == [100, 101]
    assert_images_equal(result.images, raw(raw_sd15, 100, count=2, prompt=PROMPT))
    for index, seed in enumerate(result.seeds):
        lone = sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=seed, num_inference_steps=STEPS))
        difference = np.abs(as_array(result.images[index]) - as_array(lone.images[0]))
        assert difference.max() <= 1, f"image {index} is {difference.max()} levels from a lone run with seed {seed}"


@pytest.mark.parametrize("steps", [1, 4])
def test_step_count(sd15_engine: Any, raw_sd15: Any, steps: int) -> None:
    result = sd15_engine.generate(GenerationRequest(prompt="a cat", seed=1, num_inference_steps=steps))
    assert_images_equal(result.images, raw(raw_sd15, 1, prompt="a cat", num_inference_steps=steps))


def test_progress_callback_sees_every_step(sd15_engine: Any, raw_sd15: Any) -> None:
    steps: list[tuple[int, int]] = []
    result = sd15_engine.generate(
        GenerationRequest(prompt=PROMPT, seed=2, num_inference_steps=STEPS), progress=lambda s, t: steps.append((s, t))
    )
    # PNDM (the checkpoint's scheduler) runs one extra warm-up step: the total is the scheduler's own.
    expected = raw(raw_sd15, 2, prompt=PROMPT)
    total = len(raw_sd15.scheduler.timesteps)
    assert total >= STEPS
    assert steps == [(step, total) for step in range(1, total + 1)]
    assert_images_equal(result.images, expected)
