"""AUTOMATIC1111 compatibility: the ``webuiapi`` client library, unchanged, against ``t2i serve``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import webuiapi
from server_support import running_server, wait_until
from t2i_server import Limits
from t2i_server._jobs import ServedModel, Service, load_model

from t2i_core import GenerationRequest
from t2i_core.testing import assert_images_equal

MODEL = "tiny:sd15"


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return load_model(MODEL, MODEL, device="cpu")


@pytest.fixture(scope="module")
def sd15_engine(served: ServedModel) -> Any:
    """The SDK side of each comparison is the engine the server serves: the same weights and base scheduler
    (the session's tiny:sd15 engine may share a pipeline that earlier tests switched schedulers on)."""
    return served.engine


@pytest.fixture(scope="module")
def base(served: ServedModel) -> Iterator[str]:
    with running_server(Service([served], Limits())) as url:
        yield url


def client_for(base: str, **auth: str) -> Any:
    address = urlsplit(base)
    return webuiapi.WebUIApi(host=address.hostname, port=address.port, **auth)


def sdk(engine: Any, **fields: Any) -> list[Any]:
    return engine.generate(GenerationRequest(**fields)).images


def test_webuiapi_gets_the_sdk_images_and_automatic1111_info(base: str, sd15_engine: Any) -> None:
    port = urlsplit(base).port  # docs/serving.md shows this test's call, from here on
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
    result = api.txt2img(
        prompt="a castle",
        negative_prompt="fog",
        seed=11,
        steps=2,
        cfg_scale=6.5,
        width=64,
        height=56,
        batch_size=2,
        n_iter=2,
        sampler_name="Euler a",
    )
    info = result.info
    assert len(result.images) == 4 and info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 56, 2, 6.5)
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == MODEL and info["index_of_first_image"] == 0
    assert info["all_prompts"] == ["a castle"] * 4 and info["all_negative_prompts"] == ["fog"] * 4
    common = {"prompt": "a castle", "negative_prompt": "fog", "num_inference_steps": 2, "guidance_scale": 6.5}
    common.update(height=56, width=64, num_images=2, scheduler="euler-ancestral")
    assert_images_equal(result.images, [*sdk(sd15_engine, seed=11, **common), *sdk(sd15_engine, seed=13, **common)])
    assert result.images[2].info["parameters"] == info["infotexts"][2]
    assert info["infotexts"][2].startswith("a castle\nNegative prompt: fog\nSteps: 2, Sampler: Euler a, CFG scale: 6.5")
    assert "Seed: 13, Size: 64x56" in info["infotexts"][2]
    assert result.parameters["n_iter"] == 2

    # What clients read to discover the server.
    assert [model["title"] for model in api.get_sd_models()] == [MODEL]
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= {s["name"] for s in api.get_samplers()}
    assert api.get_options()["sd_model_checkpoint"] == MODEL
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_seed_minus_one_is_random_and_reported(base: str, sd15_engine: Any) -> None:
    api = client_for(base)
    first = api.txt2img(prompt="a dune", steps=2, width=64, height=64, sampler_name="DPM++ 2M", scheduler="Karras")
    seed = first.info["seed"]
    assert 0 <= seed < 2**32 and first.info["all_seeds"] == [seed]
    fields = {"prompt": "a dune", "num_inference_steps": 2, "guidance_scale": 7.0, "height": 64, "width": 64}
    assert_images_equal(first.images, sdk(sd15_engine, seed=seed, scheduler="dpm++-2m-karras", **fields))


def test_unknown_fields_are_ignored_and_unsupported_ones_named(base: str) -> None:
    with httpx.Client(base_url=base, timeout=120) as client:
        plain = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
        ok = client.post("/sdapi/v1/txt2img", json={**plain, "some_future_field": {"a": 1}, "hr_upscaler": "Latent"})
        assert ok.status_code == 200 and len(ok.json()["images"]) == 1
        for extra, field in [
            ({"sampler_name": "Heun++ 9000"}, "sampler_name"),
            ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler"),
            ({"enable_hr": True, "hr_upscaler": "SwinIR_4x"}, "hr_upscaler"),  # a model upscaler t2i lacks
            ({"tiling": True}, "tiling"),
            ({"batch_size": 3, "n_iter": 3}, "batch_size"),
            ({"steps": 10_000}, "steps"),
            ({"cfg_scale": 1e9}, "cfg_scale"),
            ({"seed": -5}, "seed"),
            (
                {"override_settings": {"sd_model_checkpoint": "/models/other.safetensors"}},
                "override_settings.sd_model_checkpoint",
            ),
            ({"alwayson_scripts": {"ControlNet": {"args": []}}}, "alwayson_scripts"),
        ]:
            response = client.post("/sdapi/v1/txt2img", json={**plain, **extra})
            assert response.status_code == 422, (extra, response.text)
            assert response.json()["error"]["field"] == field, response.json()
        chosen = client.post("/sdapi/v1/txt2img", json={**plain, "override_settings": {"sd_model_checkpoint": MODEL}})
        assert chosen.status_code == 200


def test_progress_and_interrupt(base: str, served: ServedModel) -> None:
    api = client_for(base)
    answers: dict[str, Any] = {}

    def long_call() -> None:
        answers["result"] = client_for(base).txt2img(prompt="a long one", steps=150, width=64, height=64)

    thread = threading.Thread(target=long_call)
    thread.start()
    state: dict[str, Any] = {}

    def moving() -> bool:
        state.update(api.get_progress())
        return bool(state["progress"] > 0)

    wait_until(moving, 60, "the job to make progress")
    assert state["state"]["job"] and state["state"]["sampling_steps"] >= 150 and state["eta_relative"] >= 0
    api.interrupt()
    thread.join(60)
    result = answers["result"]  # AUTOMATIC1111 answers an interrupted call with what it finished: nothing here
    assert result.images == [] and result.info["t2i"]["status"] == "cancelled"


def test_webuiapi_logs_in_with_the_token_as_password(served: ServedModel) -> None:
    with running_server(Service([served], Limits()), token="s3cret") as base:
        assert client_for(base).get_sd_models() != [MODEL]  # no token: refused (a 401 body, not the list)
        api = client_for(base, username="anyone", password="s3cret")
        assert [model["title"] for model in api.get_sd_models()] == [MODEL]
        assert len(api.txt2img(prompt="x", steps=2, width=64, height=64, seed=1).images) == 1
