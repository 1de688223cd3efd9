"""t2i-sdxl: SDK images equal raw diffusers' bit for bit, the refiner included (CONTRACT.md, reproducibility)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import tiny_folder

from t2i_core import (
    GenerationRequest,
    InvalidRequestError,
    ModelNotFoundError,
    UndetectedFamilyError,
    UnsupportedFeatureError,
    load,
)
from t2i_core.testing import as_array, assert_images_equal, cpu_generators

STEPS = 3
REFINER_STEPS = 4
PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
NEGATIVE = "ugly, deformed"
MICRO = {
    "original_size": (128, 96),
    "crops_coords_top_left": (8, 16),
    "target_size": (64, 48),
    "negative_original_size": (32, 32),
    "negative_crops_coords_top_left": (0, 4),
    "negative_target_size": (48, 48),
}
TINY_REFINER = "tiny:sdxl-refiner"


@pytest.fixture(scope="session")
def refiner_folder() -> str:
    from t2i_sdxl import _tiny

    from t2i_core.tiny import ensure_built

    name, version = _tiny.TINY_REFINERS[TINY_REFINER]
    return str(ensure_built(name, version, _tiny.build_refiner))


@pytest.fixture(scope="session")
def raw_refiner(raw_sdxl: Any, refiner_folder: str) -> Any:
    """The refiner as diffusers' documentation loads it: sharing the base's second text encoder and VAE."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner_folder, text_encoder_2=raw_sdxl.text_encoder_2, vae=raw_sdxl.vae
    )
    refiner.set_progress_bar_config(disable=True)
    return refiner


@pytest.fixture(scope="session")
def engine() -> Any:
    return load("tiny:sdxl", device="cpu")


def raw(pipeline: Any, seed: int, count: int = 1, **kwargs: Any) -> list[Any]:
    kwargs.setdefault("num_inference_steps", STEPS)
    return list(pipeline(generator=cpu_generators(seed, count), num_images_per_prompt=count, **kwargs).images)


def raw_ensemble(
    base: Any,
    refiner: Any,
    seed: int,
    count: int = 1,
    fraction: float = 0.8,
    base_only: dict[str, Any] | None = None,
    refiner_only: dict[str, Any] | None = None,
    **shared: Any,
) -> list[Any]:
    """diffusers' ensemble of expert denoisers, written out by hand: one set of generators for both stages."""
    generator = cpu_generators(seed, count)
    shared = {"num_inference_steps": REFINER_STEPS, "num_images_per_prompt": count, "generator": generator, **shared}
    latents = base(denoising_end=fraction, output_type="latent", **shared, **(base_only or {})).images
    return list(refiner(image=latents, denoising_start=fraction, **shared, **(refiner_only or {})).images)


def request(**changes: Any) -> GenerationRequest:
    return GenerationRequest(**{"prompt": PROMPT, "num_inference_steps": STEPS, **changes})


def refined(**changes: Any) -> GenerationRequest:
    options = {"refiner": TINY_REFINER, **changes.pop("options", {})}
    return GenerationRequest(**{"prompt": PROMPT, "num_inference_steps": REFINER_STEPS, **changes, "options": options})


def differs(first: Any, second: Any) -> bool:
    return not np.array_equal(as_array(first), as_array(second))


# -- the base pipeline -----------------------------------------------------------------------


def test_detected_from_model_index_without_family(sdxl_folder: str, refiner_folder: str) -> None:
    assert load(sdxl_folder, device="cpu").family == "sdxl"
    # A refiner alone is no text-to-image checkpoint: no family claims it.
    with pytest.raises(UndetectedFamilyError):
        load(refiner_folder, device="cpu")


def test_defaults_are_the_checkpoints(engine: Any, raw_sdxl: Any) -> None:
    resolved, _ = engine.resolve(GenerationRequest(prompt=PROMPT))
    assert (resolved.num_inference_steps, resolved.guidance_scale) == (50, 5.0)
    assert (resolved.height, resolved.width) == (64, 64)  # the tiny checkpoint's native size
    result = engine.generate(request(seed=31))
    assert result.seeds == [31]
    # Nothing else is passed: raw diffusers with its own defaults makes the same image.
    assert_images_equal(result.images, raw(raw_sdxl, 31, prompt=PROMPT))


def test_negative_prompt(engine: Any, raw_sdxl: Any) -> None:
    result = engine.generate(request(negative_prompt=NEGATIVE, seed=7))
    assert_images_equal(result.images, raw(raw_sdxl, 7, prompt=PROMPT, negative_prompt=NEGATIVE))
    assert differs(result.images[0], engine.generate(request(seed=7)).images[0])


def test_guidance_scale_and_non_square_size(engine: Any, raw_sdxl: Any) -> None:
    result = engine.generate(request(guidance_scale=3.0, height=48, width=80, seed=11))
    assert result.images[0].size == (80, 48)
    assert_images_equal(result.images, raw(raw_sdxl, 11, prompt=PROMPT, guidance_scale=3.0, height=48, width=80))


def test_two_images_match_batched_call_and_lone_runs(engine: Any, raw_sdxl: Any) -> None:
    result = engine.generate(request(negative_prompt=NEGATIVE, seed=100, num_images=2))
    assert result.seeds == [100, 101]
    assert_images_equal(result.images, raw(raw_sdxl, 100, count=2, prompt=PROMPT, negative_prompt=NEGATIVE))
    for index, seed in enumerate(result.seeds):
        lone = engine.generate(request(negative_prompt=NEGATIVE, seed=seed))
        difference = np.abs(as_array(result.images[index]) - as_array(lone.images[0]))
        assert difference.max() <= 1, f"image {index} is {difference.max()} levels from a lone run with seed {seed}"


def test_random_seed_is_reported_and_reproduces(engine: Any, raw_sdxl: Any) -> None:
    first = engine.generate(request())
    (seed,) = first.seeds
    assert first.request.seed == seed
    assert_images_equal(first.images, raw(raw_sdxl, seed, prompt=PROMPT))
    assert_images_equal(engine.generate(request(seed=seed)).images, first.images)


def test_micro_conditioning_options(engine: Any, raw_sdxl: Any) -> None:
    result = engine.generate(request(negative_prompt=NEGATIVE, seed=3, options=MICRO))
    assert_images_equal(result.images, raw(raw_sdxl, 3, prompt=PROMPT, negative_prompt=NEGATIVE, **MICRO))
    assert differs(result.images[0], engine.generate(request(negative_prompt=NEGATIVE, seed=3)).images[0])
    # As the command line gives them (--option original_size=128,96): the same image.
    as_text = {name: ",".join(str(v) for v in value) for name, value in MICRO.items()}
    assert_images_equal(
        engine.generate(request(negative_prompt=NEGATIVE, seed=3, options=as_text)).images, result.images
    )


def test_second_text_encoder_prompts(engine: Any, raw_sdxl: Any) -> None:
    texts = {"prompt_2": "an oil painting", "negative_prompt_2": "blurry"}
    result = engine.generate(request(negative_prompt=NEGATIVE, seed=4, options=texts))
    assert_images_equal(result.images, raw(raw_sdxl, 4, prompt=PROMPT, negative_prompt=NEGATIVE, **texts))
    assert differs(result.images[0], engine.generate(request(negative_prompt=NEGATIVE, seed=4)).images[0])


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"original_size": (64,)}, "original_size"),
        ({"original_size": "64,x"}, "original_size"),
        ({"crops_coords_top_left": (-1, 0)}, "crops_coords_top_left"),
        ({"negative_target_size": 64}, "negative_target_size"),
        ({"prompt_2": 5}, "prompt_2"),
        ({"strength": 0.5}, "strength"),
        ({"high_noise_frac": 0.5}, "high_noise_frac"),
        ({"aesthetic_score": 6.0}, "aesthetic_score"),
        ({"refiner": "tiny:sdxl-refinr"}, "refiner"),
        ({"refiner": "./no/such/refiner"}, "refiner"),
        ({"refiner": TINY_REFINER, "high_noise_frac": 1.0}, "high_noise_frac"),
        ({"refiner": TINY_REFINER, "negative_aesthetic_score": 11}, "negative_aesthetic_score"),
        # diffusers' base would ignore a lone negative size: refused instead.
        ({"negative_original_size": (32, 32)}, "negative_target_size"),
        ({"negative_crops_coords_top_left": (0, 4)}, "negative_original_size"),
    ],
)
def test_bad_option_is_refused(engine: Any, options: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        engine.generate(request(seed=1, options=options))
    assert caught.value.field == f"options[{field!r}]"
    assert field in str(caught.value)


def test_unknown_option_lists_the_known_ones(engine: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        engine.resolve(request(options={"strength": 0.5}))
    for name in ("original_size", "negative_crops_coords_top_left", "refiner", "high_noise_frac"):
        assert name in caught.value.allowed


def test_refiner_must_be_an_sdxl_checkpoint(engine: Any) -> None:
    with pytest.raises(InvalidRequestError, match="StableDiffusionPipeline"):
        engine.resolve(request(options={"refiner": tiny_folder("sd15")}))


def test_refiner_alias_names_the_hub_checkpoint(engine: Any) -> None:
    # The suite runs offline: the alias resolves to the hub id, which cannot be fetched.
    with pytest.raises(ModelNotFoundError, match=r"stabilityai/stable-diffusion-xl-refiner-1\.0"):
        engine.resolve(request(options={"refiner": "sdxl-refiner"}))


# -- the refiner -----------------------------------------------------------------------------


def test_refiner_shares_text_encoder_2_and_vae(engine: Any) -> None:
    refiner = engine.provider.refiner_for(engine.pipeline, TINY_REFINER)
    assert refiner.text_encoder_2 is engine.pipeline.text_encoder_2
    assert refiner.vae is engine.pipeline.vae
    assert refiner.text_encoder is None
    assert engine.provider.refiner_for(engine.pipeline, TINY_REFINER) is refiner  # made once per engine
    other = load("tiny:sdxl", device="cpu")  # the engine cache: same weights, own pipeline and scheduler
    assert other.pipeline is not engine.pipeline
    theirs = other.provider.refiner_for(other.pipeline, TINY_REFINER)
    assert theirs is not refiner
    assert theirs.unet is refiner.unet  # loaded once per base
    assert theirs.vae is other.pipeline.vae
    assert theirs.scheduler is not refiner.scheduler


def test_refiner_takes_the_base_dtype() -> None:
    import torch

    engine = load("tiny:sdxl", device="cpu", accelerators=("bf16",))
    refiner = engine.provider.refiner_for(engine.pipeline, TINY_REFINER)
    assert refiner.unet.dtype == engine.pipeline.unet.dtype == torch.bfloat16
    assert refiner.vae is engine.pipeline.vae


def test_refiner_matches_hand_written_ensemble(engine: Any, raw_sdxl: Any, raw_refiner: Any) -> None:
    result = engine.generate(refined(negative_prompt=NEGATIVE, seed=21))
    expected = raw_ensemble(raw_sdxl, raw_refiner, 21, prompt=PROMPT, negative_prompt=NEGATIVE)
    assert_images_equal(result.images, expected)
    # The refiner did something: the base alone, run to the end, gives another image.
    alone = engine.generate(request(negative_prompt=NEGATIVE, seed=21, num_inference_steps=REFINER_STEPS))
    assert differs(result.images[0], alone.images[0])


def test_refiner_with_two_images_size_and_every_option(engine: Any, raw_sdxl: Any, raw_refiner: Any) -> None:
    scores = {"aesthetic_score": 7.5, "negative_aesthetic_score": 1.0}
    options = {**MICRO, **scores, "prompt_2": "an oil painting", "high_noise_frac": 0.5}
    size = {"height": 48, "width": 80}
    wanted = refined(negative_prompt=NEGATIVE, seed=40, num_images=2, guidance_scale=4.0, options=options, **size)
    result = engine.generate(wanted)
    assert result.seeds == [40, 41]
    assert [image.size for image in result.images] == [(80, 48), (80, 48)]
    expected = raw_ensemble(
        raw_sdxl,
        raw_refiner,
        40,
        count=2,
        fraction=0.5,
        base_only=size,
        refiner_only=scores,
        prompt=PROMPT,
        prompt_2="an oil painting",
        negative_prompt=NEGATIVE,
        guidance_scale=4.0,
        **MICRO,
    )
    assert_images_equal(result.images, expected)


def test_refiner_follows_the_scheduler_choice(engine: Any, raw_sdxl: Any, raw_refiner: Any) -> None:
    # An ancestral sampler draws noise in both stages: the generators carry on from base to refiner.
    from diffusers import EulerAncestralDiscreteScheduler

    base = type(raw_sdxl).from_pipe(
        raw_sdxl, scheduler=EulerAncestralDiscreteScheduler.from_config(raw_sdxl.scheduler.config)
    )
    refiner = type(raw_refiner).from_pipe(
        raw_refiner, scheduler=EulerAncestralDiscreteScheduler.from_config(raw_refiner.scheduler.config)
    )
    # At 0.5 the refiner takes two of the four steps, and its first one adds noise.
    result = engine.generate(refined(seed=9, scheduler="euler-ancestral", options={"high_noise_frac": 0.5}))
    assert_images_equal(result.images, raw_ensemble(base, refiner, 9, fraction=0.5, prompt=PROMPT))
    # And back to the checkpoint's own scheduler.
    assert_images_equal(engine.generate(refined(seed=9)).images, raw_ensemble(raw_sdxl, raw_refiner, 9, prompt=PROMPT))


def test_refiner_progress_counts_both_stages(engine: Any) -> None:
    steps: list[tuple[int, int]] = []
    engine.generate(refined(seed=2, options={"high_noise_frac": 0.5}), progress=lambda s, t: steps.append((s, t)))
    assert steps == [(step, REFINER_STEPS) for step in range(1, REFINER_STEPS + 1)]


def test_fraction_that_starves_a_stage_is_refused(engine: Any) -> None:
    # Two steps (timesteps 501 and 1): a handover at 0.3 (timestep 700) leaves the base nothing.
    with pytest.raises(InvalidRequestError) as caught:
        engine.generate(refined(seed=1, num_inference_steps=2, options={"high_noise_frac": 0.3}))
    assert caught.value.field == "options['high_noise_frac']"


def test_refiner_refuses_prompt_weighting(engine: Any) -> None:
    with pytest.raises(UnsupportedFeatureError, match="refiner"):
        engine.resolve(refined(prompt_weighting="compel"))


def test_refiner_refuses_an_offloaded_base() -> None:
    engine = load("tiny:sdxl", device="cpu", cache=False)
    engine.pipeline.enable_model_cpu_offload(device="cpu")  # as the cpu_offload accelerator does on CUDA
    with pytest.raises(UnsupportedFeatureError, match="offloading"):
        engine.generate(refined(seed=1))


def test_refiner_from_a_local_folder(engine: Any, refiner_folder: str, raw_sdxl: Any, raw_refiner: Any) -> None:
    result = engine.generate(refined(seed=5, options={"refiner": str(Path(refiner_folder))}))
    assert_images_equal(result.images, raw_ensemble(raw_sdxl, raw_refiner, 5, prompt=PROMPT))
