"""Sampler choice by name: parity with diffusers' scheduler built from the checkpoint's config."""

from __future__ import annotations

from typing import Any

import pytest

from t2i_core import GenerationRequest, InvalidRequestError, load
from t2i_core import schedulers as named
from t2i_core.testing import assert_images_equal, cpu_generators, raw_pipeline

PROMPT = "a watercolor fox"


@pytest.mark.parametrize("name", sorted(named.SCHEDULERS))
def test_named_scheduler_matches_diffusers(name: str, sd15_engine: Any, raw_sd15: Any) -> None:
    import diffusers

    class_name, overrides = named.SCHEDULERS[name]
    original = raw_sd15.scheduler
    raw_sd15.scheduler = getattr(diffusers, class_name).from_config(original.config, **overrides)
    try:
        expected = raw_sd15(PROMPT, num_inference_steps=4, generator=cpu_generators(12, 1)).images
    finally:
        raw_sd15.scheduler = original
    result = sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=12, num_inference_steps=4, scheduler=name))
    assert type(sd15_engine.pipeline.scheduler).__name__ == class_name
    assert result.request.scheduler == name
    assert_images_equal(result.images, expected)


def test_default_restores_the_checkpoint_scheduler(sd15_engine: Any, raw_sd15: Any) -> None:
    sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=2, scheduler="euler"))
    result = sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=2))
    assert type(sd15_engine.pipeline.scheduler).__name__ == "PNDMScheduler"
    assert result.request.scheduler == "default"
    expected = raw_sd15(PROMPT, num_inference_steps=2, generator=cpu_generators(1, 1)).images
    assert_images_equal(result.images, expected)


def test_switching_keeps_the_weights_and_reuses_the_scheduler(sd15_engine: Any) -> None:
    unet = sd15_engine.pipeline.unet
    sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=1, scheduler="ddim"))
    first = sd15_engine.pipeline.scheduler
    sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=1, scheduler="ddim"))
    assert sd15_engine.pipeline.scheduler is first
    assert sd15_engine.pipeline.unet is unet


def test_engines_never_share_scheduler_state() -> None:
    one = load("tiny:sd15", device="cpu")
    two = load("tiny:sd15", device="cpu")
    assert one.pipeline.unet is two.pipeline.unet  # weights shared by the engine cache
    one.generate(GenerationRequest(prompt=PROMPT, seed=3, num_inference_steps=2, scheduler="euler"))
    two.generate(GenerationRequest(prompt=PROMPT, seed=3, num_inference_steps=5))
    assert one.pipeline.scheduler is not two.pipeline.scheduler
    assert len(two.pipeline.scheduler.timesteps) != len(one.pipeline.scheduler.timesteps)
    assert type(two.pipeline.scheduler).__name__ == "PNDMScheduler"


def test_unknown_scheduler_lists_the_names(sd15_engine: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        sd15_engine.generate(GenerationRequest(prompt=PROMPT, scheduler="turbo"))
    message = str(caught.value)
    assert "scheduler='turbo'" in message and "dpm++-2m-karras" in message and "default" in message


FAMILIES = ("sd15", "sdxl", "kandinsky22")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_scheduler_a_family_offers_runs_and_the_rest_are_refused(family: str) -> None:
    engine = load(f"tiny:{family}", device="cpu")
    offered = engine.provider.schedulers or tuple(named.SCHEDULERS)
    for name in named.SCHEDULERS:
        request = GenerationRequest(prompt=PROMPT, seed=5, num_inference_steps=2, scheduler=name, height=64, width=64)
        if name in offered:
            assert engine.generate(request).images[0].size == (64, 64), name
        else:
            with pytest.raises(InvalidRequestError) as caught:
                engine.generate(request)
            assert f"family {family!r} can run" in str(caught.value) and offered[0] in str(caught.value)


def test_kandinsky_scheduler_matches_diffusers_decoder_scheduler() -> None:
    import diffusers

    engine = load("tiny:kandinsky22", device="cpu")
    raw = raw_pipeline(engine.source)
    class_name, overrides = named.SCHEDULERS["dpm++-2m-karras"]
    scheduler = getattr(diffusers, class_name).from_config(raw.decoder_pipe.scheduler.config, **overrides)
    raw.decoder_pipe.scheduler = scheduler
    expected = raw(PROMPT, num_inference_steps=3, height=64, width=64, generator=cpu_generators(8, 1)).images
    result = engine.generate(
        GenerationRequest(
            prompt=PROMPT, seed=8, num_inference_steps=3, height=64, width=64, scheduler="dpm++-2m-karras"
        )
    )
    assert_images_equal(result.images, expected)


@pytest.mark.parametrize(
    ("name", "setting"),
    [
        ("euler:karras", {"use_karras_sigmas": True}),
        ("lms:exponential", {"use_exponential_sigmas": True}),
        ("heun:beta", {"use_beta_sigmas": True}),
        ("ddim:trailing", {"timestep_spacing": "trailing"}),
        ("euler-ancestral:linspace", {"timestep_spacing": "linspace"}),
    ],
)
def test_schedule_modifier_is_the_diffusers_setting(
    name: str, setting: dict[str, Any], sd15_engine: Any, raw_sd15: Any
) -> None:
    import diffusers

    class_name, overrides = named.SCHEDULERS[name.split(":")[0]]
    original = raw_sd15.scheduler
    raw_sd15.scheduler = getattr(diffusers, class_name).from_config(original.config, **overrides, **setting)
    try:
        expected = raw_sd15(PROMPT, num_inference_steps=3, generator=cpu_generators(4, 1)).images
    finally:
        raw_sd15.scheduler = original
    result = sd15_engine.generate(GenerationRequest(prompt=PROMPT, seed=4, num_inference_steps=3, scheduler=name))
    used = sd15_engine.pipeline.scheduler
    assert type(used).__name__ == class_name and result.request.scheduler == name
    assert all(used.config[key] == value for key, value in setting.items())
    assert_images_equal(result.images, expected)


def test_a_modifier_replaces_the_sigma_schedule_it_conflicts_with() -> None:
    from diffusers import DPMSolverMultistepScheduler

    base = DPMSolverMultistepScheduler().config
    built = named.build("dpm++-2m-karras:exponential", base)
    assert built.config.use_exponential_sigmas and not built.config.use_karras_sigmas


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("euler-ancestral:karras", "EulerAncestralDiscreteScheduler has no 'karras'"),
        ("ddim:beta", "ddim:trailing"),
        ("euler:kl_optimal", "euler:karras, euler:exponential, euler:beta"),
        ("default:karras", "a scheduler name before :karras"),
        ("turbo:karras", "dpm++-2m-karras"),
    ],
)
def test_a_modifier_the_scheduler_class_lacks_is_refused_naming_the_pair(
    name: str, allowed: str, sd15_engine: Any
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        sd15_engine.generate(GenerationRequest(prompt=PROMPT, scheduler=name))
    assert caught.value.field == "scheduler" and f"scheduler={name!r}" in str(caught.value)
    assert allowed in str(caught.value)


def test_a_scheduler_whose_package_is_missing_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchsde" else find_spec(name))
    assert not named.installed("dpm++-sde") and named.installed("euler")
    for name in ("dpm++-sde", "dpm++-sde:karras"):
        with pytest.raises(InvalidRequestError) as caught:
            named.check(name)
        assert caught.value.field == "scheduler" and "pip install torchsde" in str(caught.value)
