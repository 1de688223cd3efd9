"""``graph-step``: the restructured whole step gives diffusers' own images, bit for bit, on CPU.

On a CPU the step runs eagerly through the same function a CUDA graph would record, so these
tests check everything but the recording itself (the GPU benchmark measures that).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from t2i_core import GenerationCancelled, GenerationRequest, load

BASE = GenerationRequest(prompt="a lighthouse at dusk", seed=7, num_inference_steps=4, scheduler="euler")


@pytest.fixture(scope="module")
def plain() -> Any:
    return load("tiny:sd15", device="cpu", accelerators=["fp32"], cache=False)


@pytest.fixture(scope="module")
def captured() -> Any:
    return load("tiny:sd15", device="cpu", accelerators=["fp32", "graph-step"], cache=False)


def images(engine: Any, request: GenerationRequest, **kwargs: Any) -> list[bytes]:
    return [image.tobytes() for image in engine.generate(request, **kwargs).images]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"negative_prompt": "fog, blur"},
        {"guidance_scale": 1.0},
        {"num_images": 2, "seed": 11},
        {"height": 48, "width": 80},
        {"prompt": "a (red)1.3 lighthouse", "prompt_weighting": "compel", "negative_prompt": "fog--"},
    ],
)
def test_the_captured_step_gives_diffusers_images(plain: Any, captured: Any, changes: dict[str, Any]) -> None:
    request = BASE.evolve(**changes)
    steps: list[int] = []
    ours = images(captured, request, progress=lambda step, total: steps.append(step))
    assert ours == images(plain, request)
    assert steps == [1, 2, 3, 4]
    assert captured.pipeline._graph_steps, "the captured loop ran"


def test_cancelling_stops_the_captured_loop(plain: Any, captured: Any) -> None:
    with pytest.raises(GenerationCancelled):
        captured.generate(BASE, progress=lambda step, total: step < 2)
    assert images(captured, BASE) == images(plain, BASE)


def test_other_schedulers_run_diffusers_loop_with_a_warning(
    plain: Any, captured: Any, caplog: pytest.LogCaptureFixture
) -> None:
    request = BASE.evolve(scheduler="ddim")
    with caplog.at_level(logging.WARNING, logger="t2i.accelerators"):
        assert images(captured, request) == images(plain, request)
    assert "graph-step' ran diffusers' own loop: the DDIMScheduler" in caplog.text


def test_other_families_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="t2i.accelerators"):
        engine = load("tiny:sdxl", device="cpu", accelerators=["fp32", "graph-step"], cache=False)
    assert type(engine.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert "accelerator 'graph-step' changed nothing" in caplog.text
