"""The AUTOMATIC1111 endpoint serves the flow-matching families (Flux, SD3, Z-Image): "Euler" runs as the
family's flow-matching Euler, the samplers with no such form are refused naming the sampler and family."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import webuiapi
from server_support import running_server
from t2i_server import Limits
from t2i_server._jobs import ServedModel, Service, load_model

from t2i_core import GenerationRequest
from t2i_core.testing import assert_images_equal

FAMILIES = ("flux", "sd3", "z-image")


@pytest.fixture(scope="module")
def served() -> dict[str, ServedModel]:
    return {family: load_model(f"tiny:{family}", f"tiny:{family}", device="cpu") for family in FAMILIES}


@pytest.fixture(scope="module")
def base(served: dict[str, ServedModel]) -> Iterator[str]:
    with running_server(Service(list(served.values()), Limits())) as url:
        yield url


@pytest.mark.parametrize("family", FAMILIES)
def test_euler_on_a_flow_family_is_its_flow_euler(base: str, served: dict[str, ServedModel], family: str) -> None:
    address = urlsplit(base)
    api = webuiapi.WebUIApi(host=address.hostname, port=address.port)
    guidance = 0.0 if family == "z-image" else 3.5
    result = api.txt2img(
        prompt="a lighthouse",
        seed=5,
        steps=2,
        cfg_scale=guidance,
        width=64,
        height=64,
        sampler_name="Euler",
        override_settings={"sd_model_checkpoint": f"tiny:{family}"},
    )
    expected = served[family].engine.generate(
        GenerationRequest(
            prompt="a lighthouse",
            seed=5,
            num_inference_steps=2,
            guidance_scale=guidance,
            height=64,
            width=64,
            scheduler="flow-euler",
        )
    )
    assert_images_equal(result.images, expected.images)
    assert result.info["sampler_name"] == "Euler"


def test_a_sampler_a_flow_family_lacks_is_refused_naming_both(base: str) -> None:
    body: dict[str, Any] = {
        "prompt": "a lighthouse",
        "steps": 2,
        "width": 64,
        "height": 64,
        "sampler_name": "DPM++ 2M",
        "override_settings": {"sd_model_checkpoint": "tiny:flux"},
    }
    answer = httpx.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=60)
    assert answer.status_code == 422, answer.text
    text = answer.text
    assert "sampler_name='DPM++ 2M' is not available for family 'flux'" in text and "'Euler'" in text
