"""What a job reports beyond its own answer: webhooks when it ends, and idempotent submission.

A webhook is the job's JSON (as ``GET /v1/jobs/{id}`` gives it) POSTed to the URL the client
named, signed with HMAC-SHA256 over the exact body bytes under the operator's
``--webhook-secret`` (header ``X-T2I-Signature: sha256=<hex>``), retried with exponential
backoff while the receiver cannot take it (no connection, a timeout, 408, 429 or 5xx).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._errors import invalid

if TYPE_CHECKING:
    from ._jobs import Job

logger = logging.getLogger("t2i.server")

#: the header that carries the body's signature
SIGNATURE_HEADER = "X-T2I-Signature"
#: statuses after which a delivery is tried again (besides no answer at all)
RETRIED = frozenset({408, 425, 429, 500, 502, 503, 504})


def check_webhook_url(url: Any, *, enabled: bool) -> None:
    """Refuse a webhook this server cannot send: webhooks off, or not an http(s) URL with a host."""
    if not enabled:
        raise invalid(
            "webhook",
            "webhooks are not enabled on this server",
            "no webhook (the operator enables them with t2i serve --webhook-secret)",
        )
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048:
        raise invalid(
            "webhook", f"webhook={url!r} is not allowed", "an http:// or https:// URL (at most 2048 characters)"
        )


def jsonable(value: Any) -> Any:
    """A request as JSON: attrs classes as objects, images as a placeholder."""
    import attrs

    if attrs.has(type(value)):
        return {field.name: jsonable(getattr(value, field.name)) for field in attrs.fields(type(value))}
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return f"<{type(value).__name__}>"


def job_urls(job: Job) -> dict[str, Any]:
    base = f"/v1/jobs/{job.id}"
    count = sum(request.num_images for request in job.requests)
    return {"self": base, "events": f"{base}/events", "images": [f"{base}/images/{i}" for i in range(count)]}


def job_document(job: Job) -> dict[str, Any]:
    """The job's JSON, as ``GET /v1/jobs/{id}`` answers it (without images)."""
    request = jsonable(job.requests[0]) if job.requests else None  # None while its model loads
    return {**job.summary(), "request": request, "urls": job_urls(job)}


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for `body`: ``sha256=`` and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Webhooks:
    """Delivers finished jobs' webhooks, each in a thread of its own, retrying with backoff."""

    def __init__(
        self, secret: str, *, delays: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0), timeout: float = 10.0
    ) -> None:
        self._secret = secret.encode()
        #: seconds to wait before each retry: len(delays) + 1 attempts in all
        self.delays = delays
        self.timeout = timeout

    def deliver(self, job: Job) -> None:
        assert job.webhook is not None
        job.delivery = {"url": job.webhook, "attempts": 0, "delivered": False, "last_error": None}
        threading.Thread(target=self._send, args=(job,), name=f"t2i-webhook-{job.id}", daemon=True).start()

    def _send(self, job: Job) -> None:
        assert job.webhook is not None and job.delivery is not None
        delivery_id = uuid.uuid4().hex
        for attempt, delay in enumerate((0.0, *self.delays), start=1):
            time.sleep(delay)
            document = {
                "event": f"job.{job.status}",
                "delivery": delivery_id,
                "sent": time.time(),
                "job": job_document(job),
            }
            body = json.dumps(document).encode()
            request = urllib.request.Request(
                job.webhook,
                data=body,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "t2i-serve",
                    SIGNATURE_HEADER: sign(self._secret, body),
                    "X-T2I-Job": job.id,
                    "X-T2I-Delivery": delivery_id,
                    "X-T2I-Attempt": str(attempt),
                },
            )
            job.delivery["attempts"] = attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    answer.read(1 << 16)
                job.delivery.update(delivered=True, last_error=None)
                return
            except urllib.error.HTTPError as exc:
                job.delivery["last_error"] = f"HTTP {exc.code}"
                if exc.code not in RETRIED:
                    break
            except (OSError, ValueError) as exc:  # no connection, a timeout, a reset
                job.delivery["last_error"] = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "t2i serve: the webhook of job %s was not delivered after %d attempt(s): %s",
            job.id,
            job.delivery["attempts"],
            job.delivery["last_error"],
        )


class IdempotencyKeys:
    """``Idempotency-Key`` → the job it made, for `window` seconds (and while the job is kept)."""

    #: longest key accepted
    MAX_LENGTH = 255

    def __init__(self, window: float) -> None:
        self.window = window
        self._keys: OrderedDict[str, tuple[str, str, float]] = OrderedDict()  # key → (job id, digest, time)

    @classmethod
    def check(cls, key: str) -> str:
        """The key, or a 422 naming the header when it is empty, too long or not printable ASCII."""
        if not key or len(key) > cls.MAX_LENGTH or not key.isascii() or not key.isprintable():
            raise invalid(
                "Idempotency-Key",
                f"Idempotency-Key={key[:40]!r} is not allowed",
                f"1 to {cls.MAX_LENGTH} printable ASCII characters",
            )
        return key

    def earlier(self, idempotency: tuple[str, str], jobs: Mapping[str, Job]) -> Job | None:
        """The job an earlier submission with this key made; a 422 if it asked for something else."""
        key, digest = idempotency
        self._forget_old()
        known = self._keys.get(key)
        if known is None:
            return None
        job_id, earlier_digest, _when = known
        job = jobs.get(job_id)
        if job is None:  # forgotten (keep_jobs): the key goes with it
            del self._keys[key]
            return None
        if earlier_digest != digest:
            raise invalid(
                "Idempotency-Key",
                f"Idempotency-Key={key[:40]!r} was used for another request (job {job_id})",
                "a new key for a new request, or the same request again",
            )
        return job

    def remember(self, idempotency: tuple[str, str], job_id: str) -> None:
        key, digest = idempotency
        self._keys[key] = (job_id, digest, time.monotonic())

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self.window
        while self._keys:
            key, (_job, _digest, when) = next(iter(self._keys.items()))
            if when >= horizon:
                return
            del self._keys[key]
