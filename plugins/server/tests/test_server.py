"""``t2i serve`` through real HTTP: a uvicorn server on an ephemeral loopback port, an HTTP client.

Every image is compared, bit for bit, with what `Engine.generate` makes for the same request;
every wait is bounded. The model is ``tiny:sd15`` with two or three steps.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from server_support import decode_png, png_base64, running_server, wait_until
from t2i_server import Limits
from t2i_server._jobs import ServedModel, Service, load_model

from t2i_core import GenerationRequest
from t2i_core.testing import assert_images_equal

MODEL = "tiny:sd15"
TIMEOUT = httpx.Timeout(120.0, connect=10.0)
#: enough steps that a job is still running when the test acts on it (cancelled long before the end)
LONG = 150


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return load_model(MODEL, MODEL, device="cpu")


@pytest.fixture(scope="module")
def base(served: ServedModel) -> Iterator[str]:
    service = Service([served], Limits(max_steps=LONG))
    with running_server(service) as url:
        yield url


@pytest.fixture
def client(base: str) -> Iterator[Any]:
    with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        yield client


def sdk_images(engine: Any, **fields: Any) -> list[Any]:
    return engine.generate(GenerationRequest(**fields)).images


def start_long_job(client: Any, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"prompt": "a long job", "num_inference_steps": LONG, **fields})
    assert response.status_code == 202, response.text
    return dict(response.json())


def wait_for_status(client: Any, job_id: str, statuses: tuple[str, ...], seconds: float = 60.0) -> dict[str, Any]:
    state: dict[str, Any] = {}

    def reached() -> bool:
        state.update(client.get(f"/v1/jobs/{job_id}").json())
        return state["status"] in statuses

    wait_until(reached, seconds, f"job {job_id} to be {' or '.join(statuses)}")
    return state


# -- results ----------------------------------------------------------------------------------


def test_generations_are_bit_exact_with_the_sdk(client: Any, sd15_engine: Any) -> None:
    fields = {"prompt": "a red fox", "negative_prompt": "blurry", "num_inference_steps": 2, "seed": 7, "num_images": 2}
    response = client.post("/v1/generations", json=fields)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["seeds"] == [7, 8] and data["model"] == MODEL and data["family"] == "sd15"
    resolved = data["request"]
    assert resolved["height"] == 64 and resolved["guidance_scale"] == 7.5 and resolved["scheduler"] == "default"
    assert_images_equal([decode_png(image) for image in data["images"]], sdk_images(sd15_engine, **fields))

    png = client.post("/v1/generations", json={**fields, "num_images": 1}, headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = decode_png(png.content)
    assert image.text["seed"] == "7" and image.text["prompt"] == "a red fox" and image.text["model"] == MODEL
    assert_images_equal([image], sdk_images(sd15_engine, **{**fields, "num_images": 1}))
    refused = client.post("/v1/generations", json=fields, headers={"Accept": "image/png"})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "num_images"


def test_sixteen_concurrent_clients_lose_nothing_and_match_the_sdk(base: str, sd15_engine: Any) -> None:
    """16 clients at once, mixed sizes, schedulers and endpoints: 16 answers, each exactly the SDK's."""
    cases = [
        {
            "prompt": f"lighthouse number {index}",
            "num_inference_steps": 2,
            "seed": 100 + index,
            "height": 64 if index % 3 else 72,
            "width": 64 if index % 4 else 56,
            "scheduler": ("default", "euler", "ddim", "dpm++-2m")[index % 4],
        }
        for index in range(16)
    ]

    def call(fields: dict[str, Any]) -> list[Any]:
        with httpx.Client(base_url=base, timeout=TIMEOUT) as own:
            if fields["seed"] % 2:  # half through the asynchronous API: submit, then fetch the image
                job = own.post("/v1/jobs", json=fields)
                assert job.status_code == 202, job.text
                state = wait_for_status(own, job.json()["id"], ("done", "failed", "cancelled"), 120)
                assert state["status"] == "done", state
                return [decode_png(own.get(state_url).content) for state_url in job.json()["urls"]["images"]]
            response = own.post("/v1/generations", json=fields)
            assert response.status_code == 200, response.text
            return [decode_png(image) for image in response.json()["images"]]

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(call, cases, timeout=300))
    assert len(answers) == 16
    for fields, images in zip(cases, answers, strict=True):
        assert_images_equal(images, sdk_images(sd15_engine, **fields))


# -- jobs, events, cancellation -------------------------------------------------------------


def read_events(
    client: Any, job_id: str, *, until: str, previews: bool = False, limit: int = 500
) -> list[dict[str, Any]]:
    """The job's SSE events up to the first of type `until` (or its end), at most `limit`."""
    events: list[dict[str, Any]] = []
    params = {"previews": "true"} if previews else {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", params=params) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                event = json.loads(line[len("data: ") :])
                assert event["type"] == kind
                events.append(event)
                if kind in (until, "done", "failed", "cancelled") or len(events) >= limit:
                    break
    return events


def test_job_events_then_cancel_a_running_and_a_queued_job(client: Any, sd15_engine: Any) -> None:
    scale = sd15_engine.pipeline.vae_scale_factor
    running = start_long_job(client, seed=1)
    queued = start_long_job(client, seed=2)
    assert queued["status"] == "queued" and queued["position"] >= 1
    events = read_events(client, running["id"], until="preview", previews=True)
    types = [event["type"] for event in events]
    assert "started" in types and types[-1] == "preview", types
    step = next(event for event in events if event["type"] == "step")
    assert step["total"] in (LONG, LONG + 1) and 1 <= step["step"] <= step["total"]  # PNDM runs one more
    preview = decode_png(events[-1]["image"])
    assert preview.size == (64 // scale, 64 // scale)  # one pixel per latent

    cancelled_queued = client.delete(f"/v1/jobs/{queued['id']}")
    assert cancelled_queued.status_code == 200 and cancelled_queued.json()["status"] == "cancelled"
    assert client.delete(f"/v1/jobs/{running['id']}").status_code == 200
    twice = client.delete(f"/v1/jobs/{running['id']}")  # red team: this was a second 200
    assert twice.status_code == 409 and twice.json()["error"]["type"] in ("cancelling", "finished")
    final = read_events(client, running["id"], until="cancelled")[-1]
    assert final["type"] == "cancelled" and final["reason"] == "cancelled by the client"
    assert final["job"]["progress"]["step"] < LONG
    again = client.delete(f"/v1/jobs/{running['id']}")
    assert again.status_code == 409 and again.json()["error"]["type"] == "finished"

    # The engine that was stopped mid-schedule makes the exact image of the next request.
    fields = {"prompt": "after the cancel", "num_inference_steps": 2, "seed": 5}
    after = client.post("/v1/generations", json=fields)
    assert_images_equal([decode_png(after.json()["images"][0])], sdk_images(sd15_engine, **fields))
    listed = {job["id"]: job["status"] for job in client.get("/v1/jobs").json()["jobs"]}
    assert listed[running["id"]] == "cancelled" and listed[queued["id"]] == "cancelled"
    assert client.get("/v1/jobs/nope").status_code == 404


def test_a_client_that_disconnects_cancels_its_synchronous_job(base: str, client: Any) -> None:
    def leave_early() -> None:
        with httpx.Client(base_url=base, timeout=httpx.Timeout(1.5)) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                impatient.post("/v1/generations", json={"prompt": "abandoned", "num_inference_steps": LONG})

    thread = threading.Thread(target=leave_early)
    thread.start()
    thread.join(30)
    abandoned = next(job for job in client.get("/v1/jobs").json()["jobs"] if job["status"] != "done")
    state = wait_for_status(client, abandoned["id"], ("cancelled",), 30)
    assert state["reason"] == "the client disconnected" and state["progress"]["step"] < LONG


def test_models_on_one_device_share_its_worker_in_order(served: ServedModel) -> None:
    first = ServedModel(name="first", engine=served.engine, checker=served.checker)
    second = ServedModel(name="second", engine=load_model(MODEL, MODEL, device="cpu").engine, checker=served.checker)
    service = Service([first, second], Limits(max_steps=LONG))
    assert list(service.workers) == ["cpu"]
    with running_server(service) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        blocker = start_long_job(client, model="first")
        wait_for_status(client, blocker["id"], ("running",))
        queued = [
            client.post("/v1/jobs", json={"prompt": "x", "num_inference_steps": 2, "model": model}).json()
            for model in ("second", "first", "second")
        ]
        assert [job["position"] for job in queued] == [1, 2, 3]
        client.delete(f"/v1/jobs/{blocker['id']}")
        finished = [wait_for_status(client, job["id"], ("done",)) for job in queued]
        assert [job["model"] for job in finished] == ["second", "first", "second"]
        starts = [job["started"] for job in finished]
        assert starts == sorted(starts)  # in the order they were queued, whatever their model


def test_a_full_queue_answers_503_with_retry_after(served: ServedModel) -> None:
    service = Service([served], Limits(max_steps=LONG, queue_size=1))
    with running_server(service) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        running = start_long_job(client)
        wait_for_status(client, running["id"], ("running",))
        queued = start_long_job(client)
        full = client.post("/v1/jobs", json={"prompt": "one too many", "num_inference_steps": 2})
        assert full.status_code == 503 and full.json()["error"]["type"] == "queue_full"
        assert 1 <= int(full.headers["retry-after"]) <= 60
        sync = client.post("/v1/generations", json={"prompt": "one too many", "num_inference_steps": 2})
        assert sync.status_code == 503
        metrics = client.get("/metrics").text
        assert 't2i_jobs_rejected_total{reason="queue_full"} 2' in metrics
        assert 't2i_queue_length{device="cpu"} 1' in metrics and 't2i_jobs_running{device="cpu"} 1' in metrics
        for job in (queued, running):
            assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200
        wait_for_status(client, running["id"], ("cancelled",))
        accepted = client.post("/v1/generations", json={"prompt": "room again", "num_inference_steps": 2})
        assert accepted.status_code == 200


# -- errors, limits, bodies ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"prompt": "x", "num_inference_steps": LONG + 1}, 422, "num_inference_steps"),
        ({"prompt": "x"}, 422, "num_inference_steps"),  # the family's default of 50 is over a limit of 40
        ({"prompt": "x", "num_images": 5}, 422, "num_images"),
        ({"prompt": "x", "height": 512, "width": 512, "num_inference_steps": 2}, 422, "height"),
        ({"prompt": "x", "height": 100}, 422, "height"),
        ({"prompt": "x", "seed": -3}, 422, "seed"),
        ({"prompt": "x", "seed": "7"}, 422, "seed"),
        ({"prompt": "x", "guidance_scale": 1e9}, 422, "guidance_scale"),
        ({"prompt": "x", "scheduler": "warp-drive"}, 422, "scheduler"),
        ({"prompt": "x", "model": "stabilityai/sdxl-turbo"}, 422, "model"),
        ({"prompt": "x", "model": "/etc"}, 422, "model"),
        ({"prompt": "x", "options": {"guidance_rescale": 0.5}}, 422, "options['guidance_rescale']"),
        ({"prompt": "x", "loras": [{"source": "/etc/passwd"}]}, 422, "loras"),
        ({"prompt": "   "}, 422, "prompt"),
        ({"negative_prompt": "no prompt"}, 422, "prompt"),
        ({"prompt": "x", "controls": [{"image": "AAAA", "model": "/some/controlnet"}]}, 422, "controls[0].model"),
    ],
)
def test_limits_and_bad_fields_are_4xx_naming_the_field(
    limited: str, body: dict[str, Any], status: int, field: str
) -> None:
    with httpx.Client(base_url=limited, timeout=TIMEOUT) as client:
        for path in ("/v1/generations", "/v1/jobs"):
            response = client.post(path, json=body)
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["field"] == field, error
            assert error["message"] and error["type"] == "invalid_request"


@pytest.fixture(scope="module")
def limited(served: ServedModel) -> Iterator[str]:
    limits = Limits(
        max_steps=40, max_images=4, max_pixels=128 * 128, max_body_bytes=64 * 1024, max_control_pixels=256 * 256
    )
    service = Service([served], limits, controlnets=("tiny:controlnet-sd15",))
    with running_server(service) as url:
        yield url


def test_a_served_controlnet_gives_the_sdk_image(served: ServedModel, sd15_engine: Any) -> None:
    from PIL import Image
    from t2i_server._serve import _load_controlnets

    from t2i_core import Control

    service = Service([served], Limits(), controlnets=("tiny:controlnet-sd15",))
    _load_controlnets(service, ["tiny:controlnet-sd15"])  # as t2i serve --controlnet does at start-up
    pose = Image.new("RGB", (64, 64))
    pose.paste((255, 255, 255), (16, 8, 48, 56))
    with running_server(service) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        control = {"image": png_base64(pose), "model": "tiny:controlnet-sd15", "scale": 0.7}
        response = client.post(
            "/v1/generations", json={"prompt": "x", "num_inference_steps": 2, "seed": 3, "controls": [control]}
        )
        assert response.status_code == 200, response.text
        assert response.json()["request"]["controls"][0]["model"] == "tiny:controlnet-sd15"
    expected = sdk_images(
        sd15_engine,
        prompt="x",
        num_inference_steps=2,
        seed=3,
        controls=(Control(image=pose, model="tiny:controlnet-sd15", scale=0.7),),
    )
    assert_images_equal([decode_png(response.json()["images"][0])], expected)


def iccp_bomb() -> str:
    """A small PNG whose iCCP colour profile inflates to 50 MB (PIL refuses it with a ValueError)."""
    import struct
    import zlib

    from PIL import Image

    png = base64.b64decode(png_base64(Image.new("RGB", (8, 8))))
    data = b"profile\0\0" + zlib.compress(b"\0" * 50_000_000, 9)
    chunk = struct.pack(">I", len(data)) + b"iCCP" + data
    chunk += struct.pack(">I", zlib.crc32(b"iCCP" + data) & 0xFFFFFFFF)
    header_end = 8 + 25  # the signature and the IHDR chunk
    return base64.b64encode(png[:header_end] + chunk + png[header_end:]).decode()


def test_control_images_are_checked_before_they_are_decoded(limited: str) -> None:
    from PIL import Image

    huge = png_base64(Image.new("L", (2000, 2000)))  # 4 MP of zeros: a few KB of PNG
    cases = [
        (huge, "more pixels than this server reads"),
        ("not base64!", "is not base64"),
        (png_base64(Image.new("RGB", (8, 8))).replace("iVBOR", "AAAAA"), "is not a PNG, JPEG or WebP image"),
        (iccp_bomb(), "is not a PNG, JPEG or WebP image"),  # red team: a 50 MB colour profile in 50 KB
    ]
    with httpx.Client(base_url=limited, timeout=TIMEOUT) as client:
        for image, message in cases:
            body = {"prompt": "x", "controls": [{"image": image, "model": "tiny:controlnet-sd15"}]}
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 422, response.text
            assert response.json()["error"]["field"] == "controls[0].image"
            assert message in response.json()["error"]["message"]


def test_malformed_bodies_are_400_and_unknown_routes_404(limited: str) -> None:
    with httpx.Client(base_url=limited, timeout=TIMEOUT) as client:
        headers = {"Content-Type": "application/json"}
        broken = client.post("/v1/generations", content=b'{"prompt": "x",', headers=headers)
        assert broken.status_code == 400 and broken.json()["error"]["type"] == "malformed_json"
        for content in (b"[1, 2]", b'"a string"'):
            response = client.post("/v1/jobs", content=content, headers=headers)
            assert response.status_code == 400 and response.json()["error"]["type"] == "malformed_body"
        for content, why in (
            (b'{"prompt": "\xff\xfe"}', "it is not UTF-8"),
            (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
            (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "the body is not valid JSON: "),
        ):
            response = client.post("/v1/jobs", content=content, headers=headers)
            error = response.json()["error"]
            assert response.status_code == 400 and error["type"] == "malformed_json", (content[:20], response.text)
            assert why in error["message"]
        form = client.post(
            "/v1/jobs", content=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert form.status_code == 400 and form.json()["error"]["type"] == "malformed_body"
        missing = client.get("/v2/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
        wrong = client.get("/v1/generations")
        assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "method_not_allowed"


def test_huge_bodies_are_refused_with_413_and_the_server_stays_up(limited: str) -> None:
    with httpx.Client(base_url=limited, timeout=TIMEOUT) as client:
        declared = client.post(
            "/v1/jobs", content=b"{" + b" " * (64 * 1024), headers={"Content-Type": "application/json"}
        )
        assert declared.status_code == 413 and declared.json()["error"]["type"] == "body_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: 32 MB announced chunk by chunk
            yield b'{"prompt": "'
            for _ in range(512):
                yield b"x" * 65536

        started = time.monotonic()
        try:
            streamed = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        except httpx.TransportError:
            pass  # the server may close the connection while the client is still sending: also a refusal
        else:
            assert streamed.status_code == 413, streamed.text
        assert time.monotonic() - started < 60
        assert client.get("/healthz").status_code == 200
        assert client.post("/v1/jobs", json={"prompt": "x", "num_inference_steps": 2}).status_code == 202


# -- security -----------------------------------------------------------------------------


def test_the_token_is_required_everywhere_but_healthz(served: ServedModel) -> None:
    import base64

    service = Service([served], Limits())
    with running_server(service, token="s3cret") as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        # Open to probes, but the model names (maybe local paths) only with the token (red team).
        assert client.get("/healthz").json() == {"status": "ok"}
        authorized = client.get("/healthz", headers={"Authorization": "Bearer s3cret"})
        assert authorized.json() == {"status": "ok", "models": list(service.models)}
        for path in ("/", "/v1/models", "/metrics", "/openapi.json", "/sdapi/v1/sd-models", "/v1/jobs/x", "/nothing"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"]["type"] == "unauthorized"
        assert client.get("/").headers["www-authenticate"].startswith("Basic")  # browsers ask for it
        assert client.get("/v1/models").headers["www-authenticate"].startswith("Bearer")
        assert client.post("/v1/jobs", json={"prompt": "x"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        basic = base64.b64encode(b"anyone:s3cret").decode()
        assert client.get("/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        huge = client.post("/v1/jobs", content=b"x" * (16 * 1024 * 1024), headers={"Content-Type": "application/json"})
        assert huge.status_code == 401  # refused before its body is read


def test_clients_cannot_name_a_path_or_hub_id(served: ServedModel, limited: str) -> None:
    """Only the served models (under their public names) and ControlNets exist for a client."""
    named = ServedModel(name="house-style", engine=served.engine, checker=served.checker)
    service = Service([named], Limits())
    with running_server(service) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        listed = client.get("/v1/models").json()
        assert [model["name"] for model in listed["models"]] == ["house-style"]
        assert served.engine.source not in json.dumps(listed)
        assert client.get("/sdapi/v1/sd-models").json()[0]["filename"] == "house-style"
        for model in (MODEL, served.engine.source, "stable-diffusion-v1-5/stable-diffusion-v1-5"):
            response = client.post("/v1/jobs", json={"prompt": "x", "model": model})
            assert response.status_code == 422 and response.json()["error"]["field"] == "model"
        response = client.post(
            "/v1/generations", json={"prompt": "x", "model": "house-style", "num_inference_steps": 2}
        )
        assert response.status_code == 200 and response.json()["model"] == "house-style"


# -- operations ---------------------------------------------------------------------------


def test_metrics_health_openapi_and_the_page(client: Any) -> None:
    assert client.post("/v1/generations", json={"prompt": "counted", "num_inference_steps": 2}).status_code == 200
    assert client.get("/healthz").json() == {"status": "ok", "models": [MODEL]}
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in metrics.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['t2i_jobs_total{outcome="done"}'] >= 1 and samples["t2i_steps_total"] >= 2
    assert samples['t2i_job_latency_seconds_bucket{le="+Inf"}'] == samples["t2i_job_latency_seconds_count"] >= 1
    assert samples[f't2i_model_info{{model="{MODEL}",family="sd15",device="cpu"}}'] == 1
    assert re.search(r"^# TYPE t2i_job_latency_seconds histogram$", metrics.text, re.M)

    schema = client.get("/openapi.json").json()
    for path in ("/v1/generations", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/sdapi/v1/txt2img"):
        assert path in schema["paths"], path
    assert "GenerationBody" in schema["components"]["schemas"]
    assert client.get("/docs").status_code == 404  # Swagger's page would load its code from a CDN

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # nothing from another host
    for element in (
        'id="prompt"',
        'id="negative"',
        'id="model"',
        'id="width"',
        'id="height"',
        'id="steps"',
        'id="guidance"',
        'id="seed"',
        'id="progress"',
        'id="preview"',
        'id="gallery"',
    ):
        assert element in page.text


def test_shutdown_finishes_or_cancels_jobs_and_refuses_new_ones(served: ServedModel, sd15_engine: Any) -> None:
    """What SIGTERM does (tests/test_server_shutdown.py sends a real one): here with a short deadline."""
    service = Service([served], Limits(max_steps=LONG, shutdown_timeout=0.5))
    with running_server(service) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        answers: dict[str, Any] = {}

        def long_call() -> None:
            answers["long"] = client.post("/v1/generations", json={"prompt": "too long", "num_inference_steps": LONG})

        thread = threading.Thread(target=long_call)
        thread.start()
        wait_until(lambda: bool(service.running()), 30, "the long job to start")
        service.begin_shutdown()
        assert client.get("/healthz").status_code == 503
        refused = client.post("/v1/jobs", json={"prompt": "late", "num_inference_steps": 2})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down"
        thread.join(60)
        assert answers["long"].status_code == 503, answers["long"].text
        assert "shutting down" in answers["long"].json()["error"]["message"]
    fields = {"prompt": "still exact", "num_inference_steps": 2, "seed": 3}
    assert_images_equal(served.engine.generate(GenerationRequest(**fields)).images, sdk_images(sd15_engine, **fields))


def test_connections_beyond_the_cap_get_503_at_once(served: ServedModel) -> None:
    """Red team: connections were uncapped; idle ones hold a slot, a client past --max-connections gets 503."""
    import socket
    from urllib.parse import urlsplit

    service = Service([served], Limits(max_connections=2))
    with running_server(service) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        address = urlsplit(base)
        idle = [socket.create_connection((address.hostname, address.port)) for _ in range(2)]
        try:
            time.sleep(0.2)  # the server has accepted them
            assert client.get("/healthz").status_code == 503
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: client.get("/healthz").status_code == 200, 30, "a free connection slot")


def test_a_connection_that_sends_no_complete_request_is_closed(served: ServedModel) -> None:
    """Red team: slow clients were never timed out (a head sent a byte at a time held a slot for ever)."""
    import socket
    from urllib.parse import urlsplit

    service = Service([served], Limits(header_timeout=1.0))
    with running_server(service) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        address = urlsplit(base)
        silent = socket.create_connection((address.hostname, address.port))
        partial = socket.create_connection((address.hostname, address.port))
        partial.sendall(b"GET /healthz HTTP/1.1\r\nHost: t2i\r\n")  # never the blank line that ends it
        try:
            for sock in (silent, partial):
                sock.settimeout(10)
                assert sock.recv(1024) == b""  # closed by the server within a few seconds
        finally:
            silent.close()
            partial.close()
        assert client.get("/healthz").status_code == 200  # a client that sends its requests is served
        time.sleep(2.5)
        assert client.get("/v1/models").status_code == 200  # and may wait between them (keep-alive or not)
