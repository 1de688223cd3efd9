"""``t2i batch`` and ``t2i serve``'s native API make the SDK's images for tiny:sd3, options included."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from t2i_core import Engine, GenerationRequest, load, run_batch
from t2i_core.batch.jobs import build_request
from t2i_core.batch.manifest import MANIFEST
from t2i_core.testing import assert_images_equal

MODEL = "tiny:sd3"
ACCELERATORS = ("fp32",)
STEPS = 2


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One thread, as the batch workers use: on a CPU the thread count is part of the computation."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd3(t2i_tiny_cache: Path) -> Engine:
    return load(MODEL, device="cpu", accelerators=ACCELERATORS)


def test_batch_files_are_the_sdk_images(sd3: Engine, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"id": "fox", "prompt": "a red fox", "negative_prompt": "blurry", "seed": 3},
        {"id": "owl", "prompt": "an owl", "num_images": 2, "seed": 7, "options": {"t5": False}},
    ]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    summary = run_batch(
        jobs, out=out, model=MODEL, defaults={"num_inference_steps": STEPS}, device="cpu", accelerators=ACCELERATORS
    )
    assert (summary.done, summary.failed, summary.images) == (2, 0, 3)
    records = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines() if line.strip()]
    assert [record["family"] for record in records] == ["sd3", "sd3"]
    for record in records:
        result = sd3.generate(build_request(record["request"]))
        for index, entry in enumerate(record["files"]):
            assert (out / entry["name"]).read_bytes() == result.png(index), f"{entry['name']} is not the SDK's image"


def test_serve_native_api_makes_the_sdk_images(sd3: Engine) -> None:
    httpx = pytest.importorskip("httpx")
    from server_support import decode_png, running_server
    from t2i_server import Limits
    from t2i_server._jobs import Service, load_model

    served = load_model(MODEL, MODEL, device="cpu", accelerators=ACCELERATORS)
    fields: dict[str, Any] = {
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "num_inference_steps": STEPS,
        "seed": 21,
        "num_images": 2,
        "options": {"max_sequence_length": 64},
    }
    with running_server(Service([served], Limits())) as base, httpx.Client(base_url=base, timeout=120.0) as client:
        response = client.post("/v1/generations", json=fields)
        refused = client.post("/v1/generations", json={**fields, "options": {"skip_guidance_layers": "9"}})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["family"] == "sd3" and data["seeds"] == [21, 22]
    images = [decode_png(image) for image in data["images"]]
    assert_images_equal(images, sd3.generate(GenerationRequest(**fields)).images, "the SDK")
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "options['skip_guidance_layers']"
