"""Image prompts through the native API: inline images only, adapters named at start-up, the SDK's image."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from server_support import decode_png, png_base64, running_server
from t2i_server import Limits
from t2i_server._jobs import ServedModel, Service, load_model

from t2i_core import GenerationRequest, ImagePrompt
from t2i_core.testing import assert_images_equal

pytest.importorskip("t2i_ipadapter")

MODEL = "tiny:sd15"
ADAPTER = "tiny:ip-adapter-sd15"
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def reference_image() -> Any:
    from PIL import Image

    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return load_model(MODEL, MODEL, device="cpu")


@pytest.fixture(scope="module")
def base(served: ServedModel) -> Iterator[str]:
    from t2i_server._serve import _load_ip_adapters

    service = Service([served], Limits(), ip_adapters=(ADAPTER,))
    _load_ip_adapters(service, [ADAPTER])  # as t2i serve --ip-adapter does at start-up
    with running_server(service) as url:
        yield url


def test_an_inline_image_prompt_gives_the_sdk_image(base: str, served: ServedModel) -> None:
    image = reference_image()
    body = {
        "prompt": "x",
        "num_inference_steps": 2,
        "seed": 3,
        "image_prompts": [{"image": png_base64(image), "model": ADAPTER, "scale": 0.6}],
    }
    with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        response = client.post("/v1/generations", json=body)
        assert response.status_code == 200, response.text
        assert client.get("/v1/models").json()["ip_adapters"] == [ADAPTER]
    request = GenerationRequest(
        prompt="x", num_inference_steps=2, seed=3, image_prompts=(ImagePrompt(image, ADAPTER, 0.6),)
    )
    assert_images_equal([decode_png(response.json()["images"][0])], served.engine.generate(request).images)


@pytest.mark.parametrize(
    ("prompt", "field", "message"),
    [
        ({"image": "/etc/hostname", "model": ADAPTER}, "image_prompts[0].image", "is not base64"),
        ({"image": "AAAA", "model": "h94/IP-Adapter"}, "image_prompts[0].model", "is not served here"),
        ({"image": "AAAA", "model": ADAPTER, "subfolder": "models"}, "image_prompts[0].subfolder", "is not a field"),
    ],
)
def test_paths_and_unserved_adapters_are_refused(base: str, prompt: dict[str, Any], field: str, message: str) -> None:
    with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        response = client.post("/v1/generations", json={"prompt": "x", "image_prompts": [prompt]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and message in error["message"], error
