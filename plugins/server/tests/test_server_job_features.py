"""Job features production servers have: priorities, idempotent submission, webhooks, queue deadlines.

Through real HTTP against a uvicorn server; webhooks go to a real local HTTP receiver. Images are
compared with `Engine.generate`; every wait is bounded.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_support import decode_png, running_server, wait_until
from t2i_server import Limits
from t2i_server._jobs import ServedModel, Service, load_model

from t2i_core import GenerationRequest
from t2i_core.testing import assert_images_equal

MODEL = "tiny:sd15"
TIMEOUT = httpx.Timeout(120.0, connect=10.0)
LONG = 150
SECRET = "webhook-s3cret"


@pytest.fixture(scope="module")
def served() -> ServedModel:
    return load_model(MODEL, MODEL, device="cpu")


@pytest.fixture(scope="module")
def service(served: ServedModel) -> Service:
    service = Service([served], Limits(max_steps=LONG), webhook_secret=SECRET)
    assert service.webhooks is not None
    service.webhooks.delays = (0.05, 0.1, 0.2)  # quick retries for the test
    return service


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[httpx.Client]:
    with running_server(service) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        yield client


def status_of(client: httpx.Client, job_id: str, wanted: tuple[str, ...]) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(client.get(f"/v1/jobs/{job_id}").json())
        return found.get("status") in wanted

    wait_until(reached, 120, f"job {job_id} in {wanted}")
    return found


def submit(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"prompt": "a job", "num_inference_steps": 2, **fields})
    assert response.status_code == 202, response.text
    return dict(response.json())


def test_higher_priorities_run_first_and_fifo_within_one(client: httpx.Client) -> None:
    blocker = submit(client, num_inference_steps=LONG)
    status_of(client, blocker["id"], ("running",))
    order = [0, 1, 2, 1, 2, 0]
    jobs = [submit(client, prompt=f"job {index}", priority=priority) for index, priority in enumerate(order)]
    assert [job["priority"] for job in jobs] == order
    queued = [client.get(f"/v1/jobs/{job['id']}").json()["position"] for job in jobs]
    assert queued == [5, 3, 1, 4, 2, 6]  # 2s first, then 1s, then 0s, each in the order they came
    client.delete(f"/v1/jobs/{blocker['id']}")
    finished = [status_of(client, job["id"], ("done",)) for job in jobs]
    started = sorted(range(len(jobs)), key=lambda index: finished[index]["started"])
    assert [order[index] for index in started] == [2, 2, 1, 1, 0, 0]
    assert started == [2, 4, 1, 3, 0, 5]
    for bad in (3, -1, "high", True, 1.5):
        response = client.post("/v1/jobs", json={"prompt": "x", "priority": bad})
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["field"] == "priority"


def test_an_idempotency_key_gives_the_same_job_for_the_same_body(client: httpx.Client, served: ServedModel) -> None:
    body = {"prompt": "once only", "num_inference_steps": 2}  # no seed: a retry must not make a new one
    first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and first.json()["request"] == again.json()["request"]
    other = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-18"})
    assert other.json()["id"] != first.json()["id"]
    changed = client.post("/v1/jobs", json={**body, "prompt": "twice"}, headers={"Idempotency-Key": "order-17"})
    assert changed.status_code == 422 and changed.json()["error"]["field"] == "Idempotency-Key"
    assert "was used for another request" in changed.json()["error"]["message"]
    # The synchronous call with the key of a job answers with that job's images.
    done = status_of(client, first.json()["id"], ("done",))
    sync = client.post("/v1/generations", json=body, headers={"Idempotency-Key": "sync-1"})
    replay = client.post("/v1/generations", json=body, headers={"Idempotency-Key": "sync-1"})
    assert sync.status_code == replay.status_code == 200
    assert sync.headers["x-t2i-job"] == replay.headers["x-t2i-job"]
    assert sync.json()["images"] == replay.json()["images"]
    request = GenerationRequest(prompt="once only", num_inference_steps=2, seed=done["seeds"][0])
    image = decode_png(client.get(f"/v1/jobs/{first.json()['id']}/images/0").content)
    assert_images_equal([image], served.engine.generate(request).images)
    assert client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "x" * 300}).status_code == 422


def test_a_job_past_its_queue_deadline_expires_without_running(client: httpx.Client) -> None:
    blocker = submit(client, num_inference_steps=LONG)
    status_of(client, blocker["id"], ("running",))
    waiting = submit(client, max_queue_seconds=0.3)
    expired = status_of(client, waiting["id"], ("expired",))
    assert expired["started"] is None and "max_queue_seconds=0.3" in expired["reason"]
    sync = client.post("/v1/generations", json={"prompt": "x", "num_inference_steps": 2, "max_queue_seconds": 0.3})
    assert sync.status_code == 503 and sync.json()["error"]["type"] == "expired" and "retry-after" in sync.headers
    client.delete(f"/v1/jobs/{blocker['id']}")
    quick = submit(client, max_queue_seconds=60)
    assert status_of(client, quick["id"], ("done",))["max_queue_seconds"] == 60
    assert 't2i_jobs_total{outcome="expired"} 2' in client.get("/metrics").text
    for bad in (0, -1, "soon"):
        response = client.post("/v1/jobs", json={"prompt": "x", "max_queue_seconds": bad})
        assert response.status_code == 422 and response.json()["error"]["field"] == "max_queue_seconds"


class Receiver:
    """A local HTTP server that records webhook deliveries; the first `failures` get a 503."""

    def __init__(self, failures: int = 0) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.failures = failures
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = 503 if len(receiver.deliveries) <= receiver.failures else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhooks_are_signed_retried_and_carry_the_jobs_json(client: httpx.Client) -> None:
    receiver = Receiver(failures=2)
    try:
        job = submit(client, webhook=receiver.url, seed=4)
        done = status_of(client, job["id"], ("done",))
        wait_until(lambda: len(receiver.deliveries) == 3, 30, "three delivery attempts")
        headers, body = receiver.deliveries[-1]
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-t2i-signature"], expected)
        assert [h["x-t2i-attempt"] for h, _ in receiver.deliveries] == ["1", "2", "3"]
        document = json.loads(body)
        assert document["event"] == "job.done" and document["job"]["id"] == job["id"]
        assert document["job"]["seeds"] == [4] and document["job"]["request"]["prompt"] == "a job"
        assert document["job"]["urls"]["images"] == [f"/v1/jobs/{job['id']}/images/0"]
        state = client.get(f"/v1/jobs/{job['id']}").json()["webhook"]
        assert state["delivered"] and state["attempts"] == 3 and done["status"] == "done"
    finally:
        receiver.close()
    # A receiver that never answers: the attempts end, and the job says why.
    gone = submit(client, webhook=receiver.url)
    status_of(client, gone["id"], ("done",))
    wait_until(
        lambda: client.get(f"/v1/jobs/{gone['id']}").json()["webhook"]["attempts"] == 4, 30, "every attempt made"
    )
    state = client.get(f"/v1/jobs/{gone['id']}").json()["webhook"]
    assert not state["delivered"] and state["last_error"]
    for bad in ("ftp://example.com/x", "not a url", "http://"):
        response = client.post("/v1/jobs", json={"prompt": "x", "webhook": bad})
        assert response.status_code == 422 and response.json()["error"]["field"] == "webhook"


def test_webhooks_are_refused_where_the_operator_did_not_enable_them(served: ServedModel) -> None:
    with running_server(Service([served], Limits())) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        response = client.post("/v1/jobs", json={"prompt": "x", "webhook": "http://127.0.0.1:9/hook"})
        error = response.json()["error"]
        assert response.status_code == 422 and error["field"] == "webhook" and "--webhook-secret" in error["allowed"]
