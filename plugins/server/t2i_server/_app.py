"""The HTTP application: native ``/v1`` API, AUTOMATIC1111's ``/sdapi/v1``, health, metrics and the page.

Every error is JSON, ``{"error": {"type", "message", "field"?, "allowed"?}}``, with a 4xx status
for what the client can change (5xx only for the server's own failures and 503 when busy).
The two outermost layers are plain ASGI: the bearer token (every path but ``/healthz``), then the
body size limit, so neither an unauthenticated nor an oversized request reaches FastAPI.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from t2i_core import Control, GenerationRequest, HiresFix, ImagePrompt, InvalidRequestError

from . import _a1111
from ._errors import Problem, from_t2i, invalid
from ._jobs import CANCELLED, DONE, EXPIRED, FAILED, SHUTTING_DOWN, Job, ServedModel, Service
from ._schemas import JOB_FIELDS, ControlBody, GenerationBody, HiresBody, ImagePromptBody, Txt2ImgBody
from ._webhooks import IdempotencyKeys, job_document
from ._webhooks import jsonable as _jsonable

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: seconds between two SSE comments that keep a quiet event stream (and its proxies) open
HEARTBEAT_SECONDS = 15.0
#: seconds between two checks that the client of a synchronous call is still there
DISCONNECT_POLL_SECONDS = 0.5
_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def create_app(service: Service, *, token: str | None = None) -> FastAPI:
    """The ASGI application over `service`: its workers start and stop with the application's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="t2i serve",
        version=_a1111.VERSION.split()[-1],
        description="Text-to-image over HTTP: the native API (/v1), AUTOMATIC1111's (/sdapi/v1), health and "
        "metrics. Errors are JSON that name the field. See docs/serving.md.",
        docs_url=None,  # the Swagger and ReDoc pages load their code from a CDN: /openapi.json only
        redoc_url=None,
        lifespan=lifespan,
    )
    _errors(app)
    _native(app, service)
    _automatic1111(app, service)
    _operations(app, service)
    app.add_middleware(BodyLimit, limit=service.limits.max_body_bytes)
    app.add_middleware(BearerToken, token=token)
    return app


# -- errors ---------------------------------------------------------------------------------


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data), status_code=status, media_type="application/json", headers=headers)


def _problem(problem: Problem) -> Response:
    return _json(problem.body(), problem.status, problem.headers)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def on_problem(_request: Request, exc: Problem) -> Response:
        return _problem(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError) -> Response:
        return _problem(_validation_problem(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException) -> Response:
        unreadable = _unreadable_json(exc)
        if unreadable is not None:
            return _problem(unreadable)
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        headers = dict(exc.headers or {})
        return _problem(
            Problem(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail), headers=headers)
        )

    @app.exception_handler(Exception)
    async def on_crash(_request: Request, exc: Exception) -> Response:
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return _problem(Problem(500, "internal_error", message))


def _unreadable_json(exc: StarletteHTTPException) -> Problem | None:
    """FastAPI's "error parsing the body" for JSON that `json` cannot read: say why, as ``malformed_json``."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        why = f"it is not UTF-8 ({cause.reason} at byte {cause.start})"
    elif isinstance(cause, RecursionError):
        why = "it is nested too deeply"
    elif isinstance(cause, ValueError):  # e.g. an integer of more digits than Python converts
        why = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    else:
        return None
    return Problem(400, "malformed_json", f"the body is not valid JSON: {why}")


def _validation_problem(errors: Any) -> Problem:
    """FastAPI's list of pydantic errors as one `Problem` naming the first field."""
    first: dict[str, Any] = dict(errors[0]) if errors else {"loc": ("body",), "msg": "invalid body", "type": "invalid"}
    if first.get("type") == "json_invalid":
        detail = dict(first.get("ctx") or {}).get("error", "")
        return Problem(400, "malformed_json", f"the body is not valid JSON: {detail}")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not location or first.get("type") in ("model_attributes_type", "dict_type"):
        return Problem(400, "malformed_body", "the body must be a JSON object (Content-Type: application/json)")
    field = location[0] + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in location[1:])
    if first.get("type") == "extra_forbidden":
        return invalid(field, f"{field} is not a field of this request", "the fields listed in /openapi.json")
    if first.get("type") == "missing":
        return invalid(field, f"{field} is required", "a value")
    return invalid(field, f"{field}: {first.get('msg', 'invalid value')}", str(first.get("msg", "")))


# -- request building ---------------------------------------------------------------------


def _request(service: Service, body: GenerationBody) -> tuple[ServedModel, GenerationRequest]:
    """The served model and the checked, resolved request of a native body (runs in a thread)."""
    served = service.model(body.model)
    if len(body.controls) > service.limits.max_controls:  # before any image is decoded
        count = len(body.controls)
        raise invalid(
            "controls", f"{count} controls are more than this server reads", f"at most {service.limits.max_controls}"
        )
    controls = tuple(_control(service, index, control) for index, control in enumerate(body.controls))
    if len(body.image_prompts) > service.limits.max_controls:  # image prompts count as controls
        count = len(body.image_prompts)
        raise invalid(
            "image_prompts",
            f"{count} image prompts are more than this server reads",
            f"at most {service.limits.max_controls}",
        )
    prompts = tuple(_image_prompt(service, index, prompt) for index, prompt in enumerate(body.image_prompts))
    fields = body.model_dump(exclude={"model", "controls", "image_prompts", "hires", *JOB_FIELDS})
    fields["hires"] = _hires(body.hires)
    try:
        request = GenerationRequest(**fields, controls=controls, image_prompts=prompts)
    except InvalidRequestError as exc:
        raise from_t2i(exc) from None
    return served, service.check(served, request, {})


def _hires(body: HiresBody | None) -> HiresFix | None:
    if body is None:
        return None
    try:
        return HiresFix(**body.model_dump())
    except InvalidRequestError as exc:
        raise invalid(f"hires.{exc.field}", f"hires.{exc}", exc.allowed) from None


def _control(service: Service, index: int, body: ControlBody) -> Control:
    field = f"controls[{index}]"
    if body.model not in service.controlnets:
        allowed = ", ".join(repr(c) for c in service.controlnets) or "none (the server serves no ControlNet)"
        raise invalid(f"{field}.model", f"{field}.model={body.model!r} is not served here", f"one of {allowed}")
    image = _image(body.image, f"{field}.image", service.limits.max_control_pixels)
    try:
        return Control(image=image, **body.model_dump(exclude={"image"}))
    except InvalidRequestError as exc:
        raise invalid(f"{field}.{exc.field}", f"{field}.{exc}", exc.allowed) from None


def _image_prompt(service: Service, index: int, body: ImagePromptBody) -> ImagePrompt:
    """An image prompt of a served IP-Adapter; its image comes inline, as server paths are never read."""
    field = f"image_prompts[{index}]"
    if body.model not in service.ip_adapters:
        allowed = ", ".join(repr(m) for m in service.ip_adapters) or "none (the server serves no IP-Adapter)"
        raise invalid(f"{field}.model", f"{field}.model={body.model!r} is not served here", f"one of {allowed}")
    image = _image(body.image, f"{field}.image", service.limits.max_control_pixels)
    try:
        return ImagePrompt(image=image, model=body.model, scale=body.scale)
    except InvalidRequestError as exc:
        raise invalid(f"{field}.{exc.field}", f"{field}.{exc}", exc.allowed) from None


def _image(text: str, field: str, max_pixels: int) -> Any:
    """A base64 PNG, JPEG or WebP, its size checked from its header before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, f"{field} is not base64", "a base64 PNG, JPEG or WebP image") from None
    try:
        image = Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "WEBP"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        # ValueError: a chunk that inflates past PIL's limits (a colour profile bomb); SyntaxError: a broken PNG
        raise invalid(field, f"{field} is not a PNG, JPEG or WebP image", "a base64 PNG, JPEG or WebP image") from None
    if image.width * image.height > max_pixels:
        raise invalid(
            field,
            f"{field} is {image.width}x{image.height}: more pixels than this server reads",
            f"an image of at most {max_pixels} pixels",
        )
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise invalid(field, f"{field} cannot be decoded", "a complete PNG, JPEG or WebP image") from None
    return image


def _png(job: Job, index: int, extra: dict[str, str] | None = None) -> bytes:
    """Image `index` of `job` as a PNG carrying its metadata, as ``t2i generate`` saves it."""
    from PIL.PngImagePlugin import PngInfo

    position = 0
    for result in job.results:
        if index < position + len(result.images):
            local = index - position
            info = PngInfo()
            for key, value in {**result.metadata(local), **(extra or {})}.items():
                info.add_itxt(key, value) if "\0" in value else info.add_text(key, value)
            buffer = io.BytesIO()
            result.images[local].save(buffer, format="PNG", pnginfo=info)
            return buffer.getvalue()
        position += len(result.images)
    raise IndexError(index)


def _pngs_base64(job: Job, extra: Callable[[int], dict[str, str]] | None = None) -> list[str]:
    return [
        base64.b64encode(_png(job, index, extra(index) if extra else None)).decode("ascii")
        for index in range(len(job.images))
    ]


def _submit(service: Service, served: ServedModel, requests: list[GenerationRequest], kind: str) -> Job:
    return service.submit(served, requests, kind)


async def _submit_native(service: Service, body: GenerationBody, request: Request) -> Job:
    """Queue a native job with its queueing fields and, given an ``Idempotency-Key``, at most once.

    On a loaded model the request is checked first (a bad field is a 422 at once); on one that is
    not, the job is queued at once and its model loads (``loading`` event), then it is checked.
    """
    options = service.job_options(body.priority, body.webhook, body.max_queue_seconds)
    key = request.headers.get("idempotency-key")
    idempotency = None
    if key is not None:
        digest = hashlib.sha256(f"{request.url.path}\n{body.model_dump_json()}".encode()).hexdigest()
        idempotency = (IdempotencyKeys.check(key), digest)
    name = body.model if body.model is not None else service.default_model
    if name in service.catalog.entries and name not in service.models:

        def prepare() -> tuple[ServedModel, list[GenerationRequest]]:
            served, resolved = _request(service, body)
            return served, [resolved]

        return service.submit_loading(name, prepare, "native", options, idempotency=idempotency)
    served, resolved = await run_in_threadpool(_request, service, body)
    return service.submit(served, [resolved], "native", options, idempotency=idempotency)


async def _wait(service: Service, job: Job, request: Request) -> None:
    """Until `job` ends; if the client goes away first, cancel it (its images would go nowhere)."""
    waiter = asyncio.ensure_future(job.wait())
    try:
        while not waiter.done():
            done, _pending = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_SECONDS)
            if not done and await request.is_disconnected():
                service.cancel(job, "the client disconnected")
                return
    finally:
        if not waiter.done():
            waiter.cancel()


#: failures a client may retry as they are (a full queue, no memory for the model yet)
RETRYABLE = ("queue_full", "no_memory", "shutting_down")


def event_stream(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """A job's `events` as Server-Sent Events (a heartbeat as a comment line, which keeps proxies open)."""

    async def stream() -> AsyncIterator[str]:
        async for event in events:
            if event["type"] == "heartbeat":
                yield ": keep-alive\n\n"
            else:
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


def _failure(job: Job) -> Problem:
    """The answer to a synchronous call whose job did not end well."""
    if job.status == FAILED:
        error = job.error or {}
        kind = error.get("type")
        status = 422 if kind in ("invalid_request", "unsupported") else 503 if kind in RETRYABLE else 500
        headers = {"Retry-After": "10"} if status == 503 else {}
        problem = Problem(status, str(kind or "failed"), str(error.get("message", "the job failed")), headers=headers)
        problem.field = error.get("field")
        return problem
    if job.status == EXPIRED:
        return Problem(503, "expired", f"job {job.id} expired: {job.reason}", headers={"Retry-After": "1"})
    if job.reason == SHUTTING_DOWN:
        return Problem(
            503, "shutting_down", f"job {job.id} was cancelled: {SHUTTING_DOWN}", headers={"Retry-After": "30"}
        )
    return Problem(409, "cancelled", f"job {job.id} was cancelled: {job.reason}")


def _wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "").lower()
    if "image/png" not in accept:
        return False
    return "application/json" not in accept or accept.index("image/png") < accept.index("application/json")


# -- the native API -----------------------------------------------------------------------


def _native(app: FastAPI, service: Service) -> None:
    @app.post("/v1/generations", tags=["native"])
    async def generate(body: GenerationBody, request: Request) -> Response:
        """Make images and answer with them: JSON with base64 PNGs and the resolved request, or one
        ``image/png`` when the ``Accept`` header asks for it."""
        png = _wants_png(request)
        if png and body.num_images != 1:
            raise invalid("num_images", "an image/png answer holds one image", "1 with Accept: image/png")
        job = await _submit_native(service, body, request)
        await _wait(service, job, request)
        if job.status != DONE:
            raise _failure(job)
        headers = {"X-T2I-Job": job.id, "X-T2I-Seeds": ",".join(map(str, job.seeds))}
        if png:
            return Response(await run_in_threadpool(_png, job, 0), media_type="image/png", headers=headers)
        images = await run_in_threadpool(_pngs_base64, job)
        return _json(_result(job, images), headers=headers)

    @app.post("/v1/jobs", status_code=202, tags=["native"])
    async def submit(body: GenerationBody, request: Request) -> Response:
        """Queue a generation and answer at once with the job's id (202); follow it with
        ``GET /v1/jobs/{id}`` or ``/v1/jobs/{id}/events``. The same ``Idempotency-Key`` header with the
        same body gives the same job again (while it is kept)."""
        job = await _submit_native(service, body, request)
        summary = {**job_document(job)}  # an Idempotency-Key may give an earlier job: its own request
        return _json(summary, 202, headers={"Location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs", tags=["native"])
    async def jobs() -> Response:
        """Every job the server remembers (queued, running, and the last finished ones), newest first."""
        return _json({"jobs": [job.summary() for job in reversed(service.jobs())]})

    @app.get("/v1/jobs/{job_id}", tags=["native"])
    async def job_state(job_id: str, images: bool = False) -> Response:
        """A job's state and request; with ``?images=true``, its images as base64 PNGs once done."""
        job = _job(service, job_id)
        data: dict[str, Any] = job_document(job)
        if images:
            data["images_base64"] = await run_in_threadpool(_pngs_base64, job)
        return _json(data)

    @app.get("/v1/jobs/{job_id}/images/{index}", tags=["native"])
    async def job_image(job_id: str, index: int) -> Response:
        """Image `index` of a job as a PNG with its metadata (prompt, seed, model, ...)."""
        job = _job(service, job_id)
        if not 0 <= index < len(job.images):
            raise Problem(404, "not_found", f"job {job_id} has no image {index} (it has {len(job.images)})")
        return Response(await run_in_threadpool(_png, job, index), media_type="image/png")

    @app.get("/v1/jobs/{job_id}/events", tags=["native"])
    async def job_events(job_id: str, previews: bool = False) -> Response:
        """Server-Sent Events: ``loading`` (its model loads first), ``queued`` (with the position),
        ``started``, ``step``, ``preview`` (with ``?previews=true``: a base64 PNG at 1/8 size), then
        ``done``, ``failed``, ``cancelled`` or ``expired``."""
        job = _job(service, job_id)
        return event_stream(job.events(previews=previews, heartbeat=HEARTBEAT_SECONDS))

    @app.delete("/v1/jobs/{job_id}", tags=["native"])
    async def cancel(job_id: str) -> Response:
        """Cancel a job: a queued one at once, a running one at its next step (409 once it has ended or
        while a cancel is under way)."""
        job = _job(service, job_id)
        if job.cancelling and not job.done:
            raise Problem(409, "cancelling", f"job {job_id} is already being cancelled (it stops at its next step)")
        if not service.cancel(job):
            raise Problem(409, "finished", f"job {job_id} has already ended ({job.status})")
        return _json({**job.summary(), "cancelling": job.status != CANCELLED})

    @app.get("/v1/models", tags=["native"])
    async def models() -> Response:
        """The served models with their defaults, schedulers and options; the ControlNets; the limits."""
        return _json(_models(service))


def _job(service: Service, job_id: str) -> Job:
    job = service.job(job_id)
    if job is None:
        raise Problem(404, "not_found", f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)")
    return job


def _result(job: Job, images: list[str]) -> dict[str, Any]:
    result = job.results[0]
    return {
        "job": job.id,
        "model": job.model.name,
        "family": result.family,
        "images": images,
        "seeds": job.seeds,
        "request": _jsonable(result.request),
        "timings": {
            "queued": round((job.started or job.created) - job.created, 4),
            "generating": round((job.finished or 0) - (job.started or 0), 4),
        },
    }


def _models(service: Service) -> dict[str, Any]:
    from t2i_core.kit import scheduler_names

    listed: list[dict[str, Any]] = []
    resident = service.models
    for name in service.names():
        served = resident.get(name)
        if served is None:  # not loaded: its family and defaults are known once a request loads it
            listed.append({"name": name, "loaded": False, "default": name == service.default_model})
            continue
        engine = served.engine
        provider = engine.provider
        height, width = provider.native_size(engine.pipeline)
        names = list(scheduler_names(provider.schedulers, provider.named_schedulers))
        listed.append(
            {
                "name": name,
                "loaded": True,
                "family": engine.family,
                "device": engine.device,
                "default": name == service.default_model,
                "defaults": {
                    "height": provider.defaults.height or height,
                    "width": provider.defaults.width or width,
                    "num_inference_steps": provider.defaults.num_inference_steps,
                    "guidance_scale": provider.defaults.guidance_scale,
                },
                "schedulers": names,
                "options": [
                    {"name": o.name, "allowed": o.describe(), "default": o.default, "help": o.help}
                    for o in provider.options
                ],
            }
        )
    limits = service.limits
    return {
        "models": listed,
        "controlnets": list(service.controlnets),
        "ip_adapters": list(service.ip_adapters),
        "limits": {
            "max_pixels": limits.max_pixels,
            "max_steps": limits.max_steps,
            "max_images": limits.max_images,
            "max_body_bytes": limits.max_body_bytes,
            "max_control_pixels": limits.max_control_pixels,
            "max_controls": limits.max_controls,
            "queue_size": limits.queue_size,
        },
    }


# -- AUTOMATIC1111 --------------------------------------------------------------------------


def _automatic1111(app: FastAPI, service: Service) -> None:
    @app.post("/sdapi/v1/txt2img", tags=["automatic1111"])
    async def txt2img(body: Txt2ImgBody, request: Request) -> Response:
        """AUTOMATIC1111's txt2img: ``{"images": [base64 PNG], "parameters": {...}, "info": "<JSON>"}``.
        An interrupted call answers with the images of the batches that finished, as AUTOMATIC1111 does."""
        served, requests = await run_in_threadpool(_a1111.requests_for, service, body)
        clip = _a1111.clip_stop(service, body)
        job = _submit(service, served, requests, "a1111")
        await _wait(service, job, request)
        if job.status == FAILED or (job.status == CANCELLED and job.reason == SHUTTING_DOWN):
            raise _failure(job)

        def encode() -> dict[str, Any]:
            seeds = _a1111.all_seeds(job)
            images = _pngs_base64(job, lambda i: {"parameters": _a1111.infotext(body, job, seeds[i], clip)})
            return _a1111.response(body, job, images, clip)

        return _json(await run_in_threadpool(encode), headers={"X-T2I-Job": job.id})

    @app.get("/sdapi/v1/sd-models", tags=["automatic1111"])
    async def sd_models() -> Response:
        """The served models, as AUTOMATIC1111 lists checkpoints (``title`` is what requests name)."""
        return _json(_a1111.sd_models(service))

    @app.get("/sdapi/v1/samplers", tags=["automatic1111"])
    async def samplers() -> Response:
        """AUTOMATIC1111's samplers that the default model runs, each with its t2i scheduler."""
        return _json(_a1111.samplers(service))

    @app.get("/sdapi/v1/schedulers", tags=["automatic1111"])
    async def schedules() -> Response:
        """AUTOMATIC1111's schedule types the default model runs (with at least one of its samplers)."""
        return _json(await run_in_threadpool(_a1111.schedulers, service))

    @app.get("/sdapi/v1/progress", tags=["automatic1111"])
    async def progress() -> Response:
        """The running job's progress, as AUTOMATIC1111 reports its own."""
        return _json(_a1111.progress(service))

    @app.get("/sdapi/v1/options", tags=["automatic1111"])
    async def options() -> Response:
        """The settings t2i honours; POST changes them (and names the keys it ignores)."""
        return _json(_a1111.options(service))

    @app.post("/sdapi/v1/options", tags=["automatic1111"])
    async def set_options(body: dict[str, Any]) -> Response:
        """``sd_model_checkpoint`` switches the default model among the served ones; ``CLIP_stop_at_last_layers``
        applies to later calls; other keys are accepted and ignored, named in the answer."""
        return _json(_a1111.set_options(service, body))

    @app.get("/sdapi/v1/scripts", tags=["automatic1111"])
    async def scripts() -> Response:
        """No scripts or extensions."""
        return _json({"txt2img": [], "img2img": []})

    @app.get("/sdapi/v1/loras", tags=["automatic1111"])
    async def loras() -> Response:
        """The LoRAs of ``--lora-dir`` that prompts name with ``<lora:NAME:WEIGHT>``: name, alias, path in its
        folder (never the server's path), metadata."""
        return _json(await run_in_threadpool(_a1111.loras, service))

    @app.get("/sdapi/v1/embeddings", tags=["automatic1111"])
    async def embeddings() -> Response:
        """The embeddings of ``--embeddings-dir`` by the prompt word that uses each, as AUTOMATIC1111 lists them."""
        return _json(await run_in_threadpool(_a1111.embeddings, service))

    @app.post("/sdapi/v1/refresh-loras", tags=["automatic1111"])
    async def refresh_loras() -> Response:
        """Nothing to do: t2i looks the folders up at every request, so new files are found at once."""
        return _json(None)

    @app.post("/sdapi/v1/refresh-embeddings", tags=["automatic1111"])
    async def refresh_embeddings() -> Response:
        """Nothing to do, as for LoRAs."""
        return _json(None)

    @app.post("/sdapi/v1/interrupt", tags=["automatic1111"])
    async def interrupt() -> Response:
        """Cancel the running job(s) at their next step."""
        for job in service.running():
            service.cancel(job, "interrupted")
        return _json({})


# -- operations ---------------------------------------------------------------------------


def _operations(app: FastAPI, service: Service) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        html = resources.files("t2i_server").joinpath("page.html").read_text(encoding="utf-8")
        headers = {"Content-Security-Policy": _PAGE_POLICY, "Cache-Control": "no-store"}
        return HTMLResponse(html, headers=headers)

    @app.get("/healthz", tags=["operations"])
    async def healthz(request: Request) -> Response:
        """Liveness and readiness, without a token: 200 while serving, 503 once shutting down.

        The served models' names (which may be local paths) are listed only to a client with the token.
        """
        if service.closing:
            return _json({"status": "shutting_down"}, 503)
        if not request.scope.get(AUTHORIZED, True):
            return _json({"status": "ok"})
        return _json({"status": "ok", "models": service.names()})

    @app.get("/metrics", tags=["operations"])
    async def metrics() -> Response:
        """Prometheus metrics: queue length, running jobs, jobs by outcome, steps, latency histogram."""
        queues = {device: len(worker) for device, worker in service.workers.items()}
        running = {device: int(worker.running is not None) for device, worker in service.workers.items()}
        models = [(name, s.engine.family, s.engine.device) for name, s in service.models.items()]
        text = service.metrics.render(queues, running, models)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


# -- ASGI layers --------------------------------------------------------------------------


async def _send_problem(send: Send, problem: Problem, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(problem.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(key.lower().encode(), value.encode()) for key, value in problem.headers.items()]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


#: the ASGI scope key that tells ``/healthz`` whether the client sent the token (absent: no token is needed)
AUTHORIZED = "t2i.authorized"


class BearerToken:
    """Every path but ``/healthz`` needs ``Authorization: Bearer <token>`` (or HTTP Basic with the token
    as password, which browsers and AUTOMATIC1111 clients send); none when `token` is None."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
        if scope["path"] == "/healthz":  # open to probes, but says more only to a client with the token
            await self.app({**scope, AUTHORIZED: self._allows(header)}, receive, send)
            return
        if self._allows(header):
            await self.app(scope, receive, send)
            return
        # The page asks browsers for the token as a password; API clients are told to send a bearer token.
        challenge = b'Basic realm="t2i serve", charset="UTF-8"' if scope["path"] == "/" else b'Bearer realm="t2i serve"'
        problem = Problem(401, "unauthorized", "this server needs a token: send 'Authorization: Bearer <token>'")
        await _send_problem(send, problem, [(b"www-authenticate", challenge)])

    def _allows(self, header: bytes) -> bool:
        assert self.token is not None
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(credentials.strip(), self.token)
        if scheme.lower() == b"basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(decoded.partition(b":")[2], self.token)
        return False


class BodyLimit:
    """Refuse a body larger than `limit` bytes with 413: at once from its Content-Length, or as soon as
    a chunked body passes it, so that no such body is ever held in memory."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than this server accepts ({self.limit} bytes)"
        length = next((value for key, value in scope["headers"] if key == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send_problem(send, Problem(413, "body_too_large", message), [(b"connection", b"close")])
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.limit:  # FastAPI passes an HTTPException from here on to its handler
                    raise StarletteHTTPException(413, message, headers={"Connection": "close"})
            return event

        await self.app(scope, limited_receive, send)
