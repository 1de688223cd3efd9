"""``t2i serve --ray`` on a local Ray cluster of 2 CPUs started by the test: the same HTTP API as
``t2i serve``, images bit-exact with the SDK, a job's events and cancellation through the ingress,
and a model replica killed mid-request replaced while the client gets a retryable 503.

One cluster and one Serve application (one tiny:sd15 replica) serve every test here: Ray and
Serve take seconds to start.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from t2i_core import Commands, GenerationRequest
from t2i_core.testing import assert_images_equal

MODEL = "tiny:sd15"
#: the same checkpoint under a second name: the replica keeps one model (``--models-per-replica 1``)
OTHER = "second"
TIMEOUT = httpx.Timeout(180.0, connect=10.0)
#: steps of a job that must still be running when the test acts on it
LONG = 150


def serve_args(*argv: str) -> argparse.Namespace:
    """``t2i serve ARGV`` parsed by the real command's parser."""
    from t2i_server import register_commands

    parsers: dict[str, argparse.ArgumentParser] = {}
    register_commands(Commands(lambda command: parsers.update({command.name: command.parser}), "t2i-server"))
    return parsers["serve"].parse_args(list(argv))


@pytest.fixture(scope="module")
def base(t2i_tiny_cache: Path) -> Iterator[str]:
    """The application on a local 2-CPU cluster: one CPU replica (2 torch threads) keeping one of two models."""
    import ray
    from ray import serve
    from t2i_ray._serve import deploy

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"T2I_CACHE": str(t2i_tiny_cache)}},
    )
    args = serve_args(
        *("--ray", "--model", MODEL, "--model", f"{OTHER}={MODEL}", "--port", "0", "--max-steps", str(LONG)),
        *("--max-replicas", "1", "--models-per-replica", "1"),
    )
    try:
        url = deploy(args, [(MODEL, MODEL), (OTHER, MODEL)])
        yield url
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


@pytest.fixture
def client(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def engine(t2i_tiny_cache: Path) -> Any:
    from t2i_core import load

    return load(MODEL, device="cpu")


def sdk_images(engine: Any, threads: int = 2, **fields: Any) -> list[Any]:
    """The SDK's images with the replica's torch threads (on a CPU, the thread count is part of the sums)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return list(engine.generate(GenerationRequest(**fields)).images)
    finally:
        torch.set_num_threads(before)


def decode(data: str | bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data) if isinstance(data, str) else data))
    image.load()
    return image


def events(client: httpx.Client, job_id: str, until: str = "") -> list[dict[str, Any]]:
    """A job's events through the ingress, until its final one (or the first of type `until`)."""
    seen = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if seen[-1]["type"] in ("done", "failed", "cancelled", until):
                    return seen
    return seen


def test_images_are_bit_exact_with_the_sdk_through_both_apis(client: httpx.Client, engine: Any) -> None:
    fields = {"prompt": "a lighthouse", "seed": 7, "num_inference_steps": 2, "num_images": 2}
    response = client.post("/v1/generations", json={**fields, "model": MODEL})
    assert response.status_code == 200, response.text
    assert response.headers["x-t2i-replica"].startswith("SERVE_REPLICA::t2i#t2i-models#")
    assert_images_equal([decode(image) for image in response.json()["images"]], sdk_images(engine, **fields))

    a1111 = {"prompt": "a castle", "seed": 11, "steps": 2, "cfg_scale": 6.5, "width": 64, "height": 56}
    response = client.post("/sdapi/v1/txt2img", json={**a1111, "sampler_name": "Euler a"})
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["info"])["all_seeds"] == [11]
    common = {"prompt": "a castle", "num_inference_steps": 2, "guidance_scale": 6.5, "height": 56, "width": 64}
    expected = sdk_images(engine, seed=11, scheduler="euler-ancestral", **common)
    assert_images_equal([decode(response.json()["images"][0])], expected)

    models = client.get("/v1/models").json()["models"]
    assert [(model["name"], model["default"]) for model in models] == [(MODEL, True), (OTHER, False)]
    assert models[0]["family"] == "sd15"  # the default model's entry, from its replica
    assert [model["title"] for model in client.get("/sdapi/v1/sd-models").json()] == [MODEL, OTHER]
    assert "GenerationBody" in client.get("/openapi.json").json()["components"]["schemas"]  # t2i serve's schema
    unknown = client.post("/v1/generations", json={"prompt": "x", "model": "nope"})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "model"


def test_a_job_s_events_images_and_cancellation_go_through_the_ingress(client: httpx.Client, engine: Any) -> None:
    fields = {"prompt": "a harbour", "seed": 3, "num_inference_steps": 2}
    submitted = client.post("/v1/jobs", json=fields)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    seen = events(client, job_id)
    assert seen[-1]["type"] == "done" and seen[-1]["job"]["images"] == 1
    assert any(event["type"] == "step" for event in seen) or seen[0]["type"] == "done"
    document = client.get(f"/v1/jobs/{job_id}").json()
    assert document["status"] == "done" and document["progress"]["step"] == document["progress"]["total"] > 0
    png = client.get(f"/v1/jobs/{job_id}/images/0")
    assert png.headers["content-type"] == "image/png"
    assert_images_equal([decode(png.content)], sdk_images(engine, **fields))
    assert job_id in [job["id"] for job in client.get("/v1/jobs").json()["jobs"]]

    long = client.post("/v1/jobs", json={"prompt": "a long job", "num_inference_steps": LONG}).json()["id"]
    assert events(client, long, until="step")[-1]["type"] == "step"  # it runs on the replica
    cancelled = client.delete(f"/v1/jobs/{long}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    assert events(client, long)[-1]["type"] == "cancelled"
    assert client.delete(f"/v1/jobs/{long}").status_code == 409
    # Closing the job's stream cancelled the job on its replica (its own metrics count it), long before its end.
    deadline = time.monotonic() + 30
    while 't2i_jobs_total{outcome="cancelled"} 1' not in client.get("/metrics").text:
        assert time.monotonic() < deadline, "the replica never cancelled the job"
        time.sleep(0.1)
    assert 't2i_jobs_running{device="cpu"} 0' in client.get("/metrics").text
    # A synchronous caller that goes away cancels its job on the replica, as without --ray.
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/generations", json={**fields, "num_inference_steps": LONG}, timeout=httpx.Timeout(3.0))
    while 't2i_jobs_total{outcome="cancelled"} 2' not in client.get("/metrics").text:
        assert time.monotonic() < deadline + 30, "the replica went on with a call whose client left"
        time.sleep(0.1)
    assert client.get("/v1/jobs/unknown").status_code == 404


def test_a_killed_replica_is_replaced_and_the_client_gets_a_retryable_error(client: httpx.Client, engine: Any) -> None:
    import ray

    fields = {"prompt": "a storm", "seed": 5, "num_inference_steps": 2}
    first = client.post("/v1/generations", json=fields)
    replica = first.headers["x-t2i-replica"]
    answers: list[httpx.Response] = []
    caller = threading.Thread(
        target=lambda: answers.append(client.post("/v1/generations", json={**fields, "num_inference_steps": LONG}))
    )
    caller.start()
    deadline = time.monotonic() + 60
    while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:  # the replica is making it
        assert time.monotonic() < deadline and caller.is_alive(), "the long request never ran"
        time.sleep(0.05)
    queued = client.post("/v1/jobs", json={**fields, "num_inference_steps": LONG})  # behind it, on the replica
    assert queued.status_code == 202 and queued.headers["x-t2i-replica"] == replica, queued.text
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    caller.join(120)
    assert answers, "the client got no answer"
    assert answers[0].status_code == 503, answers[0].text  # 150 steps cannot have finished
    assert answers[0].json()["error"]["type"] == "replica_unavailable"
    assert int(answers[0].headers["retry-after"]) > 0
    # The job that was waiting on the lost replica ends failed, saying so: its client submits it again.
    final = events(client, queued.json()["id"])[-1]
    assert final["type"] == "failed" and final["error"]["type"] == "replica_unavailable", final
    assert client.get(f"/v1/jobs/{queued.json()['id']}").json()["status"] == "failed"
    # Serve starts another replica; the client's retry is served there, bit-exact.
    deadline = time.monotonic() + 120
    while True:
        retry = client.post("/v1/generations", json=fields)
        if retry.status_code == 200 or time.monotonic() > deadline:
            break
        assert retry.status_code == 503 and "retry-after" in retry.headers, retry.text
        time.sleep(int(retry.headers["retry-after"]))
    assert retry.status_code == 200, retry.text
    assert retry.headers["x-t2i-replica"] != replica
    assert_images_equal([decode(retry.json()["images"][0])], sdk_images(engine, **fields))


def test_each_model_name_is_loaded_on_demand_and_evicted_least_recently_used(client: httpx.Client, engine: Any) -> None:
    fields = {"prompt": "a meadow", "seed": 9, "num_inference_steps": 2}

    def done_on_the_replica() -> int:  # the default model's service (on the replica) counts its finished jobs
        found = re.search(r't2i_jobs_total\{outcome="done"\} (\d+)', client.get("/metrics").text)
        assert found is not None
        return int(found[1])

    assert client.post("/v1/generations", json=fields).status_code == 200
    assert done_on_the_replica() >= 1
    other = client.post("/v1/generations", json={**fields, "model": OTHER})  # evicts the default model
    assert other.status_code == 200, other.text
    assert_images_equal([decode(other.json()["images"][0])], sdk_images(engine, **fields))
    assert done_on_the_replica() == 0  # the default model was loaded again: a fresh service
    again = client.post("/v1/generations", json={**fields, "model": MODEL})
    assert_images_equal([decode(again.json()["images"][0])], sdk_images(engine, **fields))


def test_two_replicas_each_keep_the_model_requests_name(base: str, client: httpx.Client, engine: Any) -> None:
    """Redeployed with 2 replicas of one model each (1 CPU and 1 torch thread each): once each model is
    loaded somewhere, every request goes to the replica that has its model."""
    from t2i_ray._serve import deploy

    port = base.rstrip("/").rpartition(":")[2]
    args = serve_args(
        *("--ray", "--model", MODEL, "--model", f"{OTHER}={MODEL}", "--port", port, "--models-per-replica", "1"),
        *("--min-replicas", "2", "--max-replicas", "2"),
    )
    deploy(args, [(MODEL, MODEL), (OTHER, MODEL)])
    fields = {"prompt": "a glacier", "seed": 4, "num_inference_steps": 2}
    served_by: dict[str, list[str]] = {MODEL: [], OTHER: []}
    answers = {}
    for _round in range(5):
        for name in (MODEL, OTHER):
            answers[name] = client.post("/v1/generations", json={**fields, "model": name})
            assert answers[name].status_code == 200, answers[name].text
            served_by[name].append(answers[name].headers["x-t2i-replica"])
    # The first rounds place the models; from then on each stays on its replica.
    assert len(set(served_by[MODEL][2:])) == 1 and len(set(served_by[OTHER][2:])) == 1, served_by
    assert served_by[MODEL][-1] != served_by[OTHER][-1], served_by
    expected = sdk_images(engine, threads=1, **fields)
    for name in (MODEL, OTHER):
        assert_images_equal([decode(answers[name].json()["images"][0])], expected)


# -- without a cluster: sizing the replicas, and the flags -----------------------------------------


def test_replicas_get_one_gpu_each_or_a_share_of_the_cpus() -> None:
    from t2i_ray._serve import plan_replicas

    from t2i_core import InvalidRequestError

    gpu = plan_replicas("auto", 4, cpus=32.0, gpus=4.0)
    assert (gpu.num_gpus, gpu.num_cpus, gpu.device, gpu.threads) == (1.0, 1.0, "cuda", None)
    assert plan_replicas("cpu", 4, cpus=32.0, gpus=4.0).device == "cpu"  # --device cpu leaves the GPUs alone
    one = plan_replicas("auto", 1, cpus=2.0, gpus=0.0)
    assert (one.num_gpus, one.num_cpus, one.device, one.threads) == (0.0, 1.0, "cpu", 2)
    many = plan_replicas("auto", 8, cpus=2.0, gpus=0.0)  # more replicas than CPUs: a fraction each
    assert (many.num_cpus, many.threads) == (0.25, 1)
    with pytest.raises(InvalidRequestError, match="no GPU"):
        plan_replicas("cuda", 1, cpus=2.0, gpus=0.0)


def test_replica_bounds_are_checked_before_any_cluster_starts() -> None:
    import subprocess
    import sys

    argv = ["serve", "--ray", "--model", MODEL, "--min-replicas", "3", "--max-replicas", "2"]
    code = "import sys; from t2i_core.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--max-replicas" in lines[0] and "--min-replicas (3)" in lines[0], lines
    with pytest.raises(SystemExit):  # argparse's own one-line error, exit 2
        serve_args("--ray", "--model", MODEL, "--target-ongoing-requests", "0")
