"""The ingress of ``t2i serve --ray``: the same HTTP API as ``t2i serve``, over the model replicas.

It checks the token and the body size (t2i serve's own ASGI layers), picks the model a request
names (else the default one) and sends the request to a replica that has it loaded
(``multiplexed_model_id``), relaying the replica's answer. Jobs are sticky: the replica that runs
a job keeps it, and the ingress keeps the job's stream (`t2i_ray._serve_jobs`). A replica that
dies under a request is a 503 with ``Retry-After`` naming ``replica_unavailable``; Ray Serve
starts another in its place.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request  # the routes' annotation: this module is imported only when serving

from ._serve_jobs import JobBook, RemoteJob, follow
from ._serve_replica import Forwarded

#: seconds a client should wait before retrying when a replica was lost (Serve starts another)
RETRY_AFTER = 5
HEARTBEAT_SECONDS = 15.0
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import Response

    return Response(json.dumps(data), status_code=status, media_type="application/json", headers=headers)


def _error(status: int, kind: str, message: str, **extra: Any) -> Any:
    headers = {"Retry-After": str(RETRY_AFTER)} if status == 503 else None
    return _json({"error": {"type": kind, "message": message, **extra}}, status, headers)


def _unavailable(exc: BaseException) -> Any:
    """The answer when the request's replica was lost or none can take it: retryable."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return _error(503, "queue_full", "every replica is busy; retry later")
    message = f"the replica serving this request was lost ({type(exc).__name__}); retry: another one is starting"
    return _error(503, "replica_unavailable", message)


class Ingress:
    """The ingress deployment (one replica): routes by model, keeps the jobs' streams."""

    def __init__(self, models: Any, args: argparse.Namespace, names: list[str]) -> None:
        self.models = models
        self.args = args
        self.names = names
        self.default = names[0]
        from t2i_server.embed import limits_from

        self.limits = limits_from(args)
        self.jobs = JobBook(self.limits.keep_jobs)
        self._followers: set[asyncio.Task[None]] = set()

    # -- talking to replicas -------------------------------------------------------------------
    def _model(self, name: Any, field: str) -> str | Any:
        """The served model `name` names (None: the default), or the 422 answer naming `field`."""
        if name is None:
            return self.default
        text = str(name)
        if text not in self.names:
            text = text.rsplit(" [", 1)[0]  # an AUTOMATIC1111 title: "name [hash]"
        if text in self.names:
            return text
        allowed = ", ".join(repr(n) for n in self.names)
        return _error(
            422,
            "invalid_request",
            f"{field}={name!r} is not served here: expected one of {allowed}",
            field=field,
            allowed=allowed,
        )

    async def _forward(self, model: str, request: Forwarded) -> Any:
        """The answer of `model`'s replica to `request`, streamed back as it comes."""
        from fastapi.responses import StreamingResponse
        from ray.exceptions import RayError, RayTaskError

        stream = self.models.options(multiplexed_model_id=model, stream=True).request.remote(request)
        try:
            start = await stream.__anext__()
        except RayTaskError as exc:  # the replica's own code failed (loading the model, say)
            cause = getattr(exc, "cause", None) or exc
            detail = str(cause).strip().splitlines()
            return _error(500, "internal_error", f"{type(cause).__name__}: {detail[-1] if detail else ''}")
        except RayError as exc:
            return _unavailable(exc)
        except StopAsyncIteration:
            return _error(500, "internal_error", "the replica sent no answer")
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in start.get("headers", [])}
        headers.pop("content-length", None)
        media = headers.pop("content-type", None)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for message in stream:
                    if message["type"] == "http.response.body":
                        yield message.get("body", b"")
            finally:
                stream.cancel()  # the client left: the replica's request sees a disconnect

        return StreamingResponse(body(), status_code=start["status"], headers=headers, media_type=media)

    async def _collect(self, model: str, request: Forwarded) -> tuple[int, Any]:
        """(status, JSON body) of `model`'s replica's answer to a small request."""
        stream = self.models.options(multiplexed_model_id=model, stream=True).request.remote(request)
        status, body = 500, b""
        async for message in stream:
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                body += message.get("body", b"")
        return status, json.loads(body or b"null")

    # -- the routes ------------------------------------------------------------------------------
    def __serve_build_asgi_app__(self) -> Any:
        from fastapi import FastAPI
        from t2i_server.embed import AUTHORIZED, BearerToken, BodyLimit

        # No schema of its own: /openapi.json comes from a replica, the API t2i serve documents.
        app = FastAPI(title="t2i serve --ray", docs_url=None, redoc_url=None, openapi_url=None)

        def forwarded(request: Request, body: bytes) -> Forwarded:
            headers = tuple((key, value) for key, value in request.scope["headers"] if key != b"authorization")
            return Forwarded(request.method, request.url.path, request.scope.get("query_string", b""), headers, body)

        def named(body: bytes, *path: str) -> Any:
            try:
                data = json.loads(body)
                for key in path:
                    data = data.get(key) if isinstance(data, dict) else None
                return data
            except ValueError:
                return None  # the replica answers malformed_json itself

        @app.post("/v1/generations")
        async def generations(request: Request) -> Any:
            body = await request.body()
            model = self._model(named(body, "model"), "model")
            return model if not isinstance(model, str) else await self._forward(model, forwarded(request, body))

        @app.post("/sdapi/v1/txt2img")
        async def txt2img(request: Request) -> Any:
            body = await request.body()
            field = "override_settings.sd_model_checkpoint"
            model = self._model(named(body, "override_settings", "sd_model_checkpoint"), field)
            return model if not isinstance(model, str) else await self._forward(model, forwarded(request, body))

        @app.post("/v1/jobs")
        async def submit(request: Request) -> Any:
            body = await request.body()
            model = self._model(named(body, "model"), "model")
            if not isinstance(model, str):
                return model
            return await self._submit(model, forwarded(request, body))

        @app.get("/v1/jobs")
        async def jobs() -> Any:
            return _json({"jobs": [job.summary() for job in reversed(self.jobs.all())]})

        @app.get("/v1/jobs/{job_id}")
        async def job_state(job_id: str, images: bool = False) -> Any:
            job = self.jobs.get(job_id)
            if job is None:
                return _not_found(job_id)
            document = dict(job.document)
            if images:
                document["images_base64"] = [base64.b64encode(png).decode("ascii") for png in job.images]
            return _json(document)

        @app.get("/v1/jobs/{job_id}/images/{index}")
        async def job_image(job_id: str, index: int) -> Any:
            from fastapi.responses import Response

            job = self.jobs.get(job_id)
            if job is None:
                return _not_found(job_id)
            if not 0 <= index < len(job.images):
                return _error(404, "not_found", f"job {job_id} has no image {index} (it has {len(job.images)})")
            return Response(job.images[index], media_type="image/png")

        @app.get("/v1/jobs/{job_id}/events")
        async def job_events(job_id: str, previews: bool = False) -> Any:
            from t2i_server.embed import event_stream

            job = self.jobs.get(job_id)
            if job is None:
                return _not_found(job_id)
            return event_stream(job.events(previews=previews, heartbeat=HEARTBEAT_SECONDS))

        @app.delete("/v1/jobs/{job_id}")
        async def cancel(job_id: str) -> Any:
            job = self.jobs.get(job_id)
            if job is None:
                return _not_found(job_id)
            if job.done:
                return _error(409, "finished", f"job {job_id} has already ended ({job.document.get('status')})")
            if job.cancelling:
                return _error(409, "cancelling", f"job {job_id} is already being cancelled")
            job.cancelling = True
            job.stream.cancel()  # the replica cancels the job (a running one stops at its next step)
            job.end({"type": "cancelled", "reason": "cancelled by the client"})
            return _json({**job.summary(), "cancelling": False})

        @app.get("/v1/models")
        async def models() -> Any:
            return await self._listing()

        @app.get("/sdapi/v1/sd-models")
        async def sd_models() -> Any:
            """Every served name, as AUTOMATIC1111 lists checkpoints (naming one loads it on a replica)."""
            fields = {"hash": None, "sha256": None, "config": None}
            return _json([{"title": n, "model_name": n, "filename": n, **fields} for n in self.names])

        @app.post("/sdapi/v1/options")
        async def set_options(request: Request) -> Any:
            body = await request.body()
            checkpoint = named(body, "sd_model_checkpoint")
            if checkpoint is not None:
                model = self._model(checkpoint, "sd_model_checkpoint")
                if not isinstance(model, str):
                    return model
                self.default = model
            return await self._forward(self.default, forwarded(request, body))

        @app.post("/sdapi/v1/interrupt")
        async def interrupt(request: Request) -> Any:
            for job in self.jobs.all():
                if not job.done and job.document.get("status") == "running":
                    job.cancelling = True
                    job.stream.cancel()
                    job.end({"type": "cancelled", "reason": "interrupted"})
            return await self._forward(self.default, forwarded(request, b""))

        @app.get("/healthz")
        async def healthz(request: Request) -> Any:
            if not request.scope.get(AUTHORIZED, True):
                return _json({"status": "ok"})
            return _json({"status": "ok", "models": self.names, "default": self.default})

        @app.api_route("/{path:path}", methods=_METHODS, include_in_schema=False)
        async def anything(request: Request) -> Any:
            """Every other route (samplers, progress, LoRAs, metrics, the page, ...): the default model's replica."""
            return await self._forward(self.default, forwarded(request, await request.body()))

        app.add_middleware(BodyLimit, limit=self.limits.max_body_bytes)
        app.add_middleware(BearerToken, token=self.args.token)  # resolve_secrets took it from the environment
        return app

    async def _submit(self, model: str, request: Forwarded) -> Any:
        from fastapi.responses import Response
        from ray.exceptions import RayError

        stream = self.models.options(multiplexed_model_id=model, stream=True).job.remote(request)
        try:
            first = await stream.__anext__()
        except RayError as exc:
            return _unavailable(exc)
        if first["status"] == 202:
            job = RemoteJob(json.loads(first["body"]))
            job.stream = stream
            self.jobs.add(job)
            task = asyncio.ensure_future(follow(job, stream, RETRY_AFTER))
            self._followers.add(task)
            task.add_done_callback(self._followers.discard)
        else:
            stream.cancel()
        headers = {k: v for k, v in first["headers"].items() if k.lower() not in ("content-length", "content-type")}
        media = first["headers"].get("content-type", "application/json")
        return Response(first["body"], status_code=first["status"], headers=headers, media_type=media)

    async def _listing(self) -> Any:
        """``/v1/models``: the default model's entry from a replica that has it (family, defaults,
        schedulers, options) with the server's ControlNets and limits; the other models by name (a
        replica loads one when a request names it; listing them all would load them all)."""
        from ray.exceptions import RayError

        try:
            status, data = await self._collect(self.default, Forwarded("GET", "/v1/models"))
        except RayError as exc:
            return _unavailable(exc)
        if status != 200:
            return _json(data, status)
        entries = {entry["name"]: entry for entry in data["models"]}
        data["models"] = [
            {**entries[name], "default": True} if name == self.default else {"name": name, "default": False}
            for name in self.names
        ]
        return _json(data)


def _not_found(job_id: str) -> Any:
    message = f"no job {job_id!r} (finished jobs are kept for a while, then forgotten; only jobs submitted here)"
    return _error(404, "not_found", message)
