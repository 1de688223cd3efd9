"""Hires fix through ``t2i serve``: A1111's ``enable_hr`` fields from the unchanged ``webuiapi`` client, and
the native API's ``hires`` object, give the SDK's `HiresFix` images (which equal the two passes on raw
diffusers: tests/test_hires.py); what t2i cannot run is a 422 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import webuiapi
from server_support import decode_png, running_server
from t2i_server import Limits
from t2i_server._a1111 import prompt_weighting
from t2i_server._jobs import ServedModel, Service, load_model

from t2i_core import GenerationRequest, HiresFix
from t2i_core.testing import assert_images_equal

MODEL = "tiny:sd15"
# What webuiapi sends by default (Euler a, CFG 7), as t2i request fields.
CALL: dict[str, Any] = {"prompt": "a lighthouse at dusk", "steps": 2, "width": 32, "height": 32, "seed": 12}
FIELDS: dict[str, Any] = {"prompt": "a lighthouse at dusk", "num_inference_steps": 2, "height": 32, "width": 32}
FIELDS.update(seed=12, guidance_scale=7.0, scheduler="euler-ancestral")


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return load_model(MODEL, MODEL, device="cpu")


@pytest.fixture(scope="module")
def base(served: ServedModel) -> Iterator[str]:
    with running_server(Service([served], Limits())) as url:
        yield url


@pytest.fixture(scope="module")
def api(base: str) -> Any:
    return webuiapi.WebUIApi(host="127.0.0.1", port=urlsplit(base).port)


def sdk(served: ServedModel, hires: HiresFix, **fields: Any) -> list[Any]:
    request = GenerationRequest(**{**FIELDS, "prompt_weighting": prompt_weighting("sd15"), **fields}, hires=hires)
    return served.engine.generate(request).images


def test_enable_hr_gives_the_sdk_hires_image(api: Any, served: ServedModel) -> None:
    result = api.txt2img(
        **CALL,
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler=webuiapi.HiResUpscaler.Latent,
        denoising_strength=0.6,
        hr_second_pass_steps=3,
    )
    expected = sdk(served, HiresFix(scale=1.5, upscaler="latent", strength=0.6, steps=3))
    assert result.images[0].size == (48, 48)
    assert_images_equal(result.images, expected)
    info = result.info
    assert info["denoising_strength"] == 0.6 and (info["width"], info["height"]) == (32, 32)
    params = info["extra_generation_params"]
    assert params["Hires upscale"] == 1.5 and params["Hires upscaler"] == "Latent" and params["Hires steps"] == 3
    assert "Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 3, Hires upscaler: Latent" in info["infotexts"][0]
    assert result.parameters["enable_hr"] is True


def test_the_other_upscalers_resize_and_prompts(api: Any, served: ServedModel) -> None:
    result = api.txt2img(
        **CALL,
        enable_hr=True,
        hr_upscaler="Lanczos",
        hr_resize_x=60,  # rounded down to 56, the height keeping the aspect
        hr_prompt="a lighthouse at dusk, detailed",
    )
    expected = sdk(
        served, HiresFix(upscaler="lanczos", strength=0.7, width=56, prompt="a lighthouse at dusk, detailed")
    )
    assert result.images[0].size == (56, 56)
    assert_images_equal(result.images, expected)
    assert result.info["extra_generation_params"]["Hires resize"] == "60x0"
    nearest = api.txt2img(**CALL, enable_hr=True, hr_scale=1.25, hr_upscaler="Latent (nearest-exact)")
    assert_images_equal(nearest.images, sdk(served, HiresFix(scale=1.25, upscaler="latent-nearest", strength=0.7)))
    plain = api.txt2img(**CALL, hr_scale=3)  # hr_* without enable_hr: the plain image, as A1111
    assert_images_equal(
        plain.images,
        served.engine.generate(GenerationRequest(**FIELDS, prompt_weighting=prompt_weighting("sd15"))).images,
    )


def test_what_t2i_cannot_run_is_a_422_naming_the_field(base: str) -> None:
    body = {**CALL, "enable_hr": True}
    with httpx.Client(base_url=base, timeout=120) as client:
        for fields, field in (
            ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler"),
            ({"hr_upscaler": "None"}, "hr_upscaler"),
            ({"hr_scale": 9}, "hr_scale"),
            ({"denoising_strength": 0}, "denoising_strength"),
            ({"hr_resize_x": 4096}, "hr_resize_x"),  # past the engine's pixel limit
        ):
            answer = client.post("/sdapi/v1/txt2img", json={**body, **fields})
            assert answer.status_code == 422, (fields, answer.text)
            error = answer.json()["error"]
            assert error["field"] == field, error
        allowed = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "ESRGAN_4x"}).json()["error"]["allowed"]
        assert "'Latent'" in allowed and "'Lanczos'" in allowed and "'Latent (nearest-exact)'" in allowed


def test_the_native_api_takes_a_hires_object(base: str, served: ServedModel) -> None:
    fields = {"prompt": "a red fox", "num_inference_steps": 2, "seed": 4, "height": 32, "width": 32}
    hires = {"scale": 1.5, "upscaler": "latent-nearest", "strength": 0.5}
    with httpx.Client(base_url=base, timeout=120) as client:
        response = client.post("/v1/generations", json={**fields, "hires": hires})
        assert response.status_code == 200, response.text
        data = response.json()
        refused = client.post("/v1/generations", json={**fields, "hires": {"upscaler": "esrgan"}})
    images = [decode_png(image) for image in data["images"]]
    assert_images_equal(images, served.engine.generate(GenerationRequest(**fields, hires=HiresFix(**hires))).images)
    assert data["request"]["hires"]["upscaler"] == "latent-nearest"
    assert json.loads(decode_png(data["images"][0]).text["hires"])["scale"] == 1.5
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "hires.upscaler"
