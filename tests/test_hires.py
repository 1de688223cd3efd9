"""Hires fix (`HiresFix`) equals the two-pass computation on raw diffusers, bit for bit on CPU.

The reference: the text-to-image pipeline with ``output_type="latent"`` (``"pil"`` for lanczos), the
latents interpolated with torch (bilinear without antialias, or nearest-exact) or the images resized
with PIL's LANCZOS, then the family's img2img pipeline made with ``from_pipe`` and a fresh generator
per image from the same seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from t2i_core import (
    Control,
    Engine,
    GenerationCancelled,
    GenerationRequest,
    HiresFix,
    InvalidRequestError,
    UnsupportedFeatureError,
    load,
)
from t2i_core.batch.jobs import build_request, describe_request
from t2i_core.testing import as_array, assert_images_equal, cpu_generators, run_cli

PROMPT = "a red fox in the snow"
STEPS = 3

IMG2IMG = {"sd15": "StableDiffusionImg2ImgPipeline", "sdxl": "StableDiffusionXLImg2ImgPipeline"}


def raw(engine: Engine) -> Any:
    """The engine's checkpoint as a diffusers user loads it."""

    pipeline = type(engine.pipeline).from_pretrained(engine.source)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def two_passes(pipeline: Any, family: str, hires: HiresFix, *, seed: int, count: int = 1, **kwargs: Any) -> list[Any]:
    """Hires fix written out on raw diffusers: txt2img to latents, enlarged, then img2img from ``from_pipe``."""
    import diffusers
    import torch
    from PIL import Image

    height, width = kwargs.pop("height"), kwargs.pop("width")
    final_w, final_h = int(width * hires.scale) // 8 * 8, int(height * hires.scale) // 8 * 8
    output = "pil" if hires.upscaler == "lanczos" else "latent"
    first = pipeline(
        height=height,
        width=width,
        num_images_per_prompt=count,
        generator=cpu_generators(seed, count),
        output_type=output,
        **kwargs,
    ).images
    if hires.upscaler == "lanczos":
        image: Any = [each.resize((final_w, final_h), Image.LANCZOS) for each in first]
    else:
        mode = "bilinear" if hires.upscaler == "latent" else "nearest-exact"
        factor = pipeline.vae_scale_factor
        image = torch.nn.functional.interpolate(
            first, size=(final_h // factor, final_w // factor), mode=mode, antialias=False
        )
    img2img = getattr(diffusers, IMG2IMG[family]).from_pipe(pipeline)
    if hires.prompt is not None:
        kwargs["prompt"] = hires.prompt
    kwargs["num_inference_steps"] = hires.steps or kwargs["num_inference_steps"]
    generators = cpu_generators(seed, count)
    return list(
        img2img(
            image=image, strength=hires.strength, num_images_per_prompt=count, generator=generators, **kwargs
        ).images
    )


@pytest.fixture(scope="module")
def sd15(t2i_tiny_cache: Path) -> Engine:
    return load("tiny:sd15", device="cpu", accelerators=("fp32",))


@pytest.fixture(scope="module")
def raw_sd15(sd15: Engine) -> Any:
    return raw(sd15)


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest", "lanczos"])
def test_sd15_hires_equals_the_two_passes_on_raw_diffusers(sd15: Engine, raw_sd15: Any, upscaler: str) -> None:
    hires = HiresFix(scale=1.5, upscaler=upscaler, strength=0.6)
    request = GenerationRequest(prompt=PROMPT, seed=11, height=32, width=48, num_inference_steps=STEPS, hires=hires)
    result = sd15.generate(request)
    assert result.images[0].size == (72, 48)
    guidance = result.request.guidance_scale
    expected = two_passes(
        raw_sd15, "sd15", hires, seed=11, prompt=PROMPT, height=32, width=48, num_inference_steps=STEPS,
        guidance_scale=guidance,
    )  # fmt: skip
    assert_images_equal(result.images, expected)
    plain = sd15.generate(request.evolve(hires=None))
    assert plain.images[0].size == (48, 32)


def test_two_images_own_steps_and_second_prompt(sd15: Engine, raw_sd15: Any) -> None:
    """Image i starts from seed + i in both passes; hires.steps and hires.prompt apply to the second pass only."""
    hires = HiresFix(scale=2.0, strength=0.5, steps=4, prompt="a fox, detailed fur", negative_prompt="blurry")
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt="blurry", seed=5, height=32, width=32, num_inference_steps=2, num_images=2
    )
    result = sd15.generate(request.evolve(hires=hires))
    assert result.seeds == [5, 6] and result.images[1].size == (64, 64)
    expected = two_passes(
        raw_sd15, "sd15", hires, seed=5, count=2, prompt=PROMPT, negative_prompt="blurry", height=32, width=32,
        num_inference_steps=2, guidance_scale=result.request.guidance_scale,
    )  # fmt: skip
    assert_images_equal(result.images, expected)


def test_a_weighting_carries_into_the_second_pass(sd15: Engine) -> None:
    """The second pass reuses the first's prompt embeddings: Compel without syntax encodes the plain text."""
    pytest.importorskip("t2i_compel")
    request = GenerationRequest(prompt=PROMPT, seed=3, height=32, width=32, num_inference_steps=2, hires=HiresFix())
    weighted = sd15.generate(request.evolve(prompt_weighting="compel"))
    assert_images_equal(weighted.images, sd15.generate(request).images)
    emphasis = sd15.generate(request.evolve(prompt="a red fox++ in the snow", prompt_weighting="compel"))
    assert not (as_array(emphasis.images[0]) == as_array(weighted.images[0])).all()


def test_progress_counts_both_passes_and_cancels_in_the_second(sd15: Engine) -> None:
    request = GenerationRequest(
        prompt=PROMPT, seed=2, height=32, width=32, num_inference_steps=4, hires=HiresFix(strength=0.5)
    )
    seen: list[tuple[int, int]] = []
    sd15.generate(request, progress=lambda step, total: seen.append((step, total)))
    totals = {total for _, total in seen}
    assert len(totals) == 1, seen  # one count from the first step on
    assert [step for step, _ in seen] == list(range(1, len(seen) + 1)) and seen[-1][0] == seen[-1][1]
    first_pass = [0]

    def counted(step: int, total: int) -> None:
        first_pass[0] += 1

    sd15.generate(request.evolve(hires=None), progress=counted)
    assert len(seen) > first_pass[0]  # the second pass's steps are counted too
    stop_at = first_pass[0] + 1
    with pytest.raises(GenerationCancelled) as caught:
        sd15.generate(request, progress=lambda step, total: step < stop_at)
    assert caught.value.step == stop_at and caught.value.total == seen[-1][1]
    assert sd15.generate(request.evolve(hires=None)).images  # the engine is still usable


def test_controls_with_hires_are_refused_before_any_work(sd15: Engine) -> None:
    from PIL import Image

    control = Control(image=Image.new("RGB", (32, 32)), model="tiny:controlnet-sd15")
    request = GenerationRequest(prompt=PROMPT, height=32, width=32, controls=(control,), hires=HiresFix())
    with pytest.raises(UnsupportedFeatureError) as caught:
        sd15.resolve(request)
    assert "hires" in caught.value.feature and "controls" in caught.value.feature


def test_hires_requests_run_alone_in_a_batch(sd15: Engine) -> None:
    base = GenerationRequest(prompt=PROMPT, height=32, width=32, num_inference_steps=2, hires=HiresFix(scale=1.25))
    requests = [base.evolve(seed=1), base.evolve(prompt="a cat", seed=2)]
    together = sd15.generate_batch(requests)
    for request, result in zip(requests, together, strict=True):
        assert_images_equal(result.images, sd15.generate(request).images)


def test_sizes_round_down_like_a1111_and_are_checked(sd15: Engine) -> None:
    request = GenerationRequest(prompt=PROMPT, seed=1, height=32, width=40, num_inference_steps=2)
    result = sd15.generate(request.evolve(hires=HiresFix(scale=1.3)))
    assert result.images[0].size == (48, 40)  # int(40 x 1.3) = 52 and int(32 x 1.3) = 41, rounded down
    result = sd15.generate(request.evolve(hires=HiresFix(width=80)))
    assert result.images[0].size == (80, 64)  # the height keeps the aspect ratio
    sd15.max_pixels, before = 64 * 64, sd15.max_pixels
    try:
        with pytest.raises(InvalidRequestError) as caught:
            sd15.resolve(request.evolve(hires=HiresFix(scale=4.0)))
    finally:
        sd15.max_pixels = before
    assert caught.value.field == "hires.scale" and "160x128" in str(caught.value)
    with pytest.raises(InvalidRequestError) as caught:  # int(1 x 0.55) = 0 steps: nothing to run
        sd15.resolve(request.evolve(num_inference_steps=1, hires=HiresFix()))
    assert caught.value.field == "hires.strength"
    assert sd15.resolve(request.evolve(num_inference_steps=1, hires=HiresFix(steps=2)))  # 1 step of 2


def test_png_metadata_and_batch_jobs_carry_it(sd15: Engine) -> None:
    hires = HiresFix(scale=1.5, upscaler="lanczos", steps=3)
    result = sd15.generate(
        GenerationRequest(prompt=PROMPT, seed=4, height=32, width=32, num_inference_steps=1, hires=hires)
    )
    saved = json.loads(result.metadata()["hires"])
    assert HiresFix(**saved) == hires
    job = build_request({"prompt": PROMPT, "hires": {"scale": 1.5, "upscaler": "lanczos", "steps": 3}})
    assert job.hires == hires
    assert build_request(describe_request(job)) == job
    with pytest.raises(InvalidRequestError) as caught:
        build_request({"prompt": PROMPT, "hires": {"upscaler": "esrgan"}})
    assert caught.value.field == "upscaler" and "lanczos" in caught.value.allowed


def test_cli_flags_and_from_round_trip(sd15: Engine, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    args = ["generate", PROMPT, "-m", "tiny:sd15", "--device", "cpu", "--accelerator", "fp32", "--seed", "9"]
    args += ["--height", "32", "--width", "32", "--steps", "2", "--hires-scale", "1.5", "--hires-steps", "3"]
    assert run_cli(*args, "-o", str(out))[0] == 0
    from PIL import Image

    with Image.open(out) as image:
        saved = json.loads(image.text["hires"])
        made = image.convert("RGB")
    assert HiresFix(**saved) == HiresFix(scale=1.5, steps=3) and made.size == (48, 48)
    request = GenerationRequest(
        prompt=PROMPT, seed=9, height=32, width=32, num_inference_steps=2, hires=HiresFix(scale=1.5, steps=3)
    )
    assert_images_equal([made], sd15.generate(request).images)
    again = tmp_path / "again.png"
    assert run_cli("generate", "--from", str(out), "-o", str(again))[0] == 0
    with Image.open(again) as image:
        assert_images_equal([image.convert("RGB")], [made])
    changed = tmp_path / "changed.png"
    assert run_cli("generate", "--from", str(out), "--hires-strength", "0.3", "-o", str(changed))[0] == 0
    with Image.open(changed) as image:
        assert HiresFix(**json.loads(image.text["hires"])) == HiresFix(scale=1.5, steps=3, strength=0.3)


def test_cli_names_the_bad_flag(tmp_path: Path) -> None:
    code, _out, err = run_cli(
        "generate", PROMPT, "-m", "tiny:sd15", "--hires-upscaler", "esrgan", "-o", str(tmp_path / "x.png")
    )
    assert code == 2 and "--hires-upscaler" in err and "latent-nearest" in err


# -- families --------------------------------------------------------------------------------------


def test_sdxl_hires_equals_the_two_passes_on_raw_diffusers(t2i_tiny_cache: Path) -> None:
    engine = load("tiny:sdxl", device="cpu", accelerators=("fp32",))
    hires = HiresFix(scale=1.5, strength=0.7)
    request = GenerationRequest(prompt=PROMPT, seed=21, height=32, width=32, num_inference_steps=STEPS, hires=hires)
    result = engine.generate(request)
    expected = two_passes(
        raw(engine), "sdxl", hires, seed=21, prompt=PROMPT, height=32, width=32, num_inference_steps=STEPS,
        guidance_scale=result.request.guidance_scale,
    )  # fmt: skip
    assert_images_equal(result.images, expected)
    with pytest.raises(UnsupportedFeatureError, match="refiner together with hires"):
        engine.resolve(request.evolve(options={"refiner": "tiny:sdxl-refiner"}))


def test_a_family_without_img2img_is_refused_before_any_work(t2i_tiny_cache: Path) -> None:
    engine = load("tiny:kandinsky22", device="cpu", accelerators=("fp32",))
    with pytest.raises(UnsupportedFeatureError) as caught:
        engine.resolve(GenerationRequest(prompt=PROMPT, hires=HiresFix()))
    assert caught.value.family == "kandinsky22" and "hires" in caught.value.feature
    assert "sd15" in caught.value.supported and "sdxl" in caught.value.supported
