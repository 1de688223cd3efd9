"""AUTOMATIC1111's samplers, schedule types, ``info``, options and override_settings; two published A1111
clients (``webuiapi`` and ``sd-backend-client``), unchanged, with their defaults, against ``t2i serve``."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import webuiapi
from pydantic import BaseModel, ConfigDict
from server_support import decode_png, running_server
from t2i_server import Limits
from t2i_server._a1111 import prompt_weighting
from t2i_server._errors import Problem
from t2i_server._jobs import ServedModel, Service, load_model
from t2i_server._samplers import SAMPLERS, SCHEDULES, scheduler_for
from t2i_server._schemas import Txt2ImgBody

from t2i_core import GenerationRequest
from t2i_core.kit import build_scheduler
from t2i_core.testing import assert_images_equal

MODEL = "tiny:sd15"
OTHER = "second"

#: the diffusers scheduler each A1111 sampler is (k-diffusion's algorithm, diffusers' class and settings)
SAMPLER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
#: A1111 1.9+'s schedule types (modules/sd_schedulers.py) and the diffusers setting that gives each; None: none does
SCHEDULE_SETTINGS: dict[str, dict[str, Any] | None] = {
    "automatic": {},
    "uniform": {"timestep_spacing": "linspace"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "polyexponential": {"use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "kl_optimal": None,
    "align_your_steps": None,
    "simple": {"timestep_spacing": "trailing"},
    "normal": {"timestep_spacing": "linspace"},
    "ddim": {"timestep_spacing": "leading"},
    "beta": {"use_beta_sigmas": True},
}
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


class A1111Info(BaseModel):
    """``Processed.js()`` of AUTOMATIC1111 1.10 (modules/processing.py): its fields and their JSON types."""

    model_config = ConfigDict(strict=True, extra="allow")

    prompt: str
    all_prompts: list[str]
    negative_prompt: str
    all_negative_prompts: list[str]
    seed: int
    all_seeds: list[int]
    subseed: int
    all_subseeds: list[int]
    subseed_strength: float | int
    width: int
    height: int
    sampler_name: str
    cfg_scale: float | int
    steps: int
    batch_size: int
    restore_faces: bool
    face_restoration_model: str | None
    sd_model_name: str
    sd_model_hash: str
    sd_vae_name: str | None
    sd_vae_hash: str | None
    seed_resize_from_w: int
    seed_resize_from_h: int
    denoising_strength: float | int | None
    extra_generation_params: dict[str, Any]
    index_of_first_image: int
    infotexts: list[str]
    styles: list[str]
    job_timestamp: str
    clip_skip: int
    is_using_inpainting_conditioning: bool
    version: str


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return load_model(MODEL, MODEL, device="cpu")


@pytest.fixture(scope="module")
def sd15_engine(served: ServedModel) -> Any:
    """The SDK side of each comparison is the engine the server serves: the same weights and base scheduler
    (the session's tiny:sd15 engine may share a pipeline that earlier tests switched schedulers on)."""
    return served.engine


@pytest.fixture(scope="module")
def service(served: ServedModel) -> Service:
    return Service([served, load_model(OTHER, MODEL, device="cpu")], Limits())


@pytest.fixture(scope="module")
def base(service: Service) -> Iterator[str]:
    with running_server(service) as url:
        yield url


def expected_scheduler(sampler: str, schedule: str) -> tuple[str, dict[str, Any]] | None:
    """The diffusers class and settings for a pair; None where diffusers has no such combination."""
    import diffusers

    class_name, settings = SAMPLER_CLASSES[sampler]
    setting = SCHEDULE_SETTINGS[schedule]
    if setting is None:
        return None
    takes = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    if any(key not in takes for key in setting):
        return None
    return class_name, {**settings, **setting}


@pytest.mark.parametrize("schedule", list(SCHEDULE_SETTINGS))
def test_each_sampler_with_each_schedule_type_is_the_diffusers_scheduler_it_names(
    schedule: str, served: ServedModel, raw_sd15: Any
) -> None:
    assert {s.name for s in SAMPLERS} == set(SAMPLER_CLASSES) and [s.name for s in SCHEDULES] == list(SCHEDULE_SETTINGS)
    for sampler in SAMPLER_CLASSES:
        body = Txt2ImgBody(sampler_name=sampler, scheduler=schedule)
        expected = expected_scheduler(sampler, schedule)
        if expected is None:
            with pytest.raises(Problem) as caught:
                scheduler_for(body, served.checker)
            assert caught.value.field == "scheduler" and caught.value.status == 422
            assert f"scheduler={schedule!r}" in caught.value.message and repr(sampler) in caught.value.message
            assert caught.value.allowed and "automatic" in caught.value.allowed
            continue
        _chosen, name = scheduler_for(body, served.checker)
        assert name is not None
        built = build_scheduler(name, raw_sd15.scheduler.config)
        class_name, settings = expected
        assert type(built).__name__ == class_name, (sampler, schedule, name)
        for key, value in settings.items():
            assert built.config[key] == value, (sampler, schedule, key)
        if any(key in SIGMA_FLAGS for key in settings):
            assert sum(bool(built.config[flag]) for flag in SIGMA_FLAGS) == 1, (sampler, schedule)


def test_a_schedule_label_in_the_sampler_name_wins_as_in_automatic1111(served: ServedModel) -> None:
    for name, schedule in [("DPM++ 2M Karras", "automatic"), ("DPM++ SDE Karras", "normal"), ("Euler Beta", None)]:
        chosen, scheduler = scheduler_for(Txt2ImgBody(sampler_name=name, scheduler=schedule), served.checker)
        assert chosen is not None and scheduler is not None
        assert name.startswith(chosen.name) and scheduler.endswith(":" + name.rsplit(" ", 1)[1].lower())


@pytest.mark.parametrize("sampler", list(SAMPLER_CLASSES))
def test_each_sampler_runs_the_scheduler_it_names_through_the_endpoint(
    sampler: str, base: str, served: ServedModel, sd15_engine: Any
) -> None:
    schedule = "karras" if expected_scheduler(sampler, "karras") else "sgm_uniform"
    plain = {"prompt": "a harbour", "steps": 4, "width": 64, "height": 64, "seed": 21}
    with httpx.Client(base_url=base, timeout=300) as client:
        answer = client.post("/sdapi/v1/txt2img", json={**plain, "sampler_name": sampler, "scheduler": schedule})
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    used = served.engine.pipeline.scheduler
    class_name, settings = expected_scheduler(sampler, schedule) or ("", {})
    assert type(used).__name__ == class_name and all(used.config[k] == v for k, v in settings.items())
    assert info["sampler_name"] == sampler
    assert info["extra_generation_params"]["Schedule type"] == ("Karras" if schedule == "karras" else "SGM Uniform")
    request = GenerationRequest(
        prompt="a harbour",
        num_inference_steps=4,
        height=64,
        width=64,
        seed=21,
        guidance_scale=info["cfg_scale"],  # the model's default: the call sends no cfg_scale
        scheduler=info["t2i"]["scheduler"],
        prompt_weighting=info["t2i"]["prompt_weighting"],
    )
    assert_images_equal([decode_png(answer.json()["images"][0])], sd15_engine.generate(request).images)


def test_schedulers_lists_what_is_served_and_the_rest_is_refused_naming_the_pair(base: str) -> None:
    with httpx.Client(base_url=base, timeout=120) as client:
        listed = client.get("/sdapi/v1/schedulers").json()
        assert [each["name"] for each in listed] == [name for name, s in SCHEDULE_SETTINGS.items() if s is not None]
        assert all(isinstance(each["label"], str) and isinstance(each["default_rho"], float) for each in listed)
        plain = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
        for sampler, schedule in [("Euler", "kl_optimal"), ("DDIM", "karras"), ("Euler a", "align_your_steps")]:
            answer = client.post("/sdapi/v1/txt2img", json={**plain, "sampler_name": sampler, "scheduler": schedule})
            assert answer.status_code == 422 and answer.json()["error"]["field"] == "scheduler"
            assert sampler in answer.json()["error"]["message"] and schedule in answer.json()["error"]["message"]
        unknown = client.post("/sdapi/v1/txt2img", json={**plain, "sampler_name": "Euler", "scheduler": "cosine"})
        assert unknown.status_code == 422 and "align_your_steps" in unknown.json()["error"]["allowed"]


def test_info_has_automatic1111s_fields_and_types(base: str, served: ServedModel) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=urlsplit(base).port)
    result = api.txt2img(
        prompt="a mill", steps=2, width=64, height=64, seed=3, scheduler="Karras", sampler_name="Euler"
    )
    info = A1111Info.model_validate(result.info)
    assert len(info.sd_model_hash) == 10 and int(info.sd_model_hash, 16) >= 0
    assert info.job_timestamp.isdigit() and len(info.job_timestamp) == 14 and info.clip_skip == 1
    assert info.extra_generation_params == {"Schedule type": "Karras"}
    assert "Schedule type: Karras, CFG scale: 7" in info.infotexts[0]
    assert f"Model hash: {info.sd_model_hash}, Model: {MODEL}" in info.infotexts[0]
    assert api.get_options()["sd_checkpoint_hash"] == info.sd_model_hash
    idle = httpx.get(f"{base}/sdapi/v1/progress").json()
    assert isinstance(idle["state"]["job_timestamp"], str)


def test_clip_skip_from_override_settings_and_options(base: str, sd15_engine: Any) -> None:
    fields: dict[str, Any] = {"prompt": "a lamp", "num_inference_steps": 2, "height": 64, "width": 64, "seed": 8}
    fields.update(guidance_scale=7.0, scheduler="euler-ancestral")  # webuiapi's default sampler, Euler a
    weighting = prompt_weighting("sd15")  # A1111's emphasis reads the skipped layer too
    expected = sd15_engine.generate(GenerationRequest(**fields, options={"clip_skip": 1}, prompt_weighting=weighting))
    expected = expected.images
    plain = sd15_engine.generate(GenerationRequest(**fields, prompt_weighting=weighting)).images
    api = webuiapi.WebUIApi(host="127.0.0.1", port=urlsplit(base).port)
    call = {"prompt": "a lamp", "steps": 2, "width": 64, "height": 64, "seed": 8}
    skipped = api.txt2img(**call, override_settings={"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337})
    assert_images_equal(skipped.images, expected)
    assert skipped.info["clip_skip"] == 2 and "Clip skip: 2, " in skipped.info["infotexts"][0]
    assert skipped.info["t2i"]["ignored_settings"] == ["eta_noise_seed_delta"]
    assert skipped.info["t2i"]["options"] == {"clip_skip": 1} and skipped.info["t2i"]["prompt_weighting"] == weighting
    # Emphasis and clip skip together, as the SDK computes them.
    emphasis = {**call, "prompt": "a (red:1.3) lamp, [blurry] ((sunny)) background"}
    both = api.txt2img(**emphasis, override_settings={"CLIP_stop_at_last_layers": 2})
    with_emphasis = {**fields, "prompt": emphasis["prompt"], "prompt_weighting": weighting}
    expected_both = sd15_engine.generate(GenerationRequest(**with_emphasis, options={"clip_skip": 1})).images
    assert_images_equal(both.images, expected_both)
    assert weighting is None or both.images[0].tobytes() != api.txt2img(**emphasis).images[0].tobytes()
    answer = api.set_options({"CLIP_stop_at_last_layers": 2, "show_progressbar": False})
    assert answer["t2i"] == {"applied": ["CLIP_stop_at_last_layers"], "ignored_settings": ["show_progressbar"]}
    try:
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        assert_images_equal(api.txt2img(**call).images, expected)
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    assert_images_equal(api.txt2img(**call).images, plain)
    bad = httpx.post(f"{base}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "CLIP_stop_at_last_layers"


def test_posting_sd_model_checkpoint_switches_the_served_model(base: str, service: Service) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=urlsplit(base).port)
    try:
        api.set_options({"sd_model_checkpoint": OTHER})
        assert api.get_options()["sd_model_checkpoint"] == OTHER and service.default_model == OTHER
        result = api.txt2img(prompt="a bell", steps=2, width=64, height=64, seed=1)
        assert result.info["sd_model_name"] == OTHER
        wrong = httpx.post(f"{base}/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"})
        assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "sd_model_checkpoint"
        assert service.default_model == OTHER
    finally:
        api.set_options({"sd_model_checkpoint": MODEL})
    assert service.default_model == MODEL


def test_webuiapi_with_its_defaults(base: str, sd15_engine: Any) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=urlsplit(base).port)
    # Its defaults (Euler a, automatic schedule, CFG 7) at a size and step count a CPU test runs quickly.
    result = api.txt2img(prompt="a corgi astronaut, detailed", seed=42, steps=2, width=64, height=64)
    A1111Info.model_validate(result.info)
    assert result.info["t2i"]["scheduler"] == "euler-ancestral" and result.images[0].size == (64, 64)
    request = GenerationRequest(
        prompt="a corgi astronaut, detailed",
        seed=42,
        num_inference_steps=2,
        guidance_scale=7.0,
        height=64,
        width=64,
        scheduler="euler-ancestral",
        prompt_weighting=result.info["t2i"]["prompt_weighting"],
    )
    assert_images_equal(result.images, sd15_engine.generate(request).images)


def test_sd_backend_client_readme_example_unchanged(base: str, sd15_engine: Any, tmp_path: Any) -> None:
    from sd_backend_client import DiffusionParams, connect_to_backend

    # The README's first example with this server's address, 64x64 and 2 steps (a quick CPU test).
    backend = connect_to_backend(base)
    params = DiffusionParams(prompt="a corgi astronaut, detailed", steps=2, width=64, height=64, seed=42)
    result = backend.submit_txt2img(params).wait(timeout=300)
    result.images[0].save(tmp_path / "corgi.png")
    assert result.raw_info is not None and result.seeds == [42]
    # its defaults: sampler "Euler a" with scheduler "normal" (A1111's Normal: timesteps evenly spaced)
    request = GenerationRequest(
        prompt="a corgi astronaut, detailed",
        seed=42,
        num_inference_steps=2,
        guidance_scale=7.0,
        height=64,
        width=64,
        scheduler="euler-ancestral:linspace",
        prompt_weighting=prompt_weighting("sd15"),  # the endpoint's: A1111 emphasis where installed
    )
    # the client hands back RGBA images (opaque): their colours are the PNG's
    assert result.images[0].getchannel("A").getextrema() == (255, 255)
    assert_images_equal([image.convert("RGB") for image in result.images], sd15_engine.generate(request).images)
