"""Jobs, and the workers that run them: one thread per device, taking jobs in order from a bounded queue.

Nothing here knows HTTP. A `Job` is one or more resolved requests for one served model; its
events (queued position, steps, previews, the outcome) go to whoever subscribed, on their own
asyncio loop. Engines are shared by threads through their lock; a second engine over the same
weights (the *checker*) resolves requests in the HTTP threads, so that checking a request
never waits for the generation the worker is running.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from t2i_core import Engine, GenerationCancelled, GenerationRequest, GenerationResult, T2IError

from ._errors import Problem, from_t2i, invalid
from ._limits import Limits
from ._metrics import Metrics
from ._models import Models
from ._webhooks import IdempotencyKeys, Webhooks, check_webhook_url
from ._worker import QueueFull, Worker

logger = logging.getLogger("t2i.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
#: a job that waited in the queue longer than its ``max_queue_seconds``: it never ran
EXPIRED = "expired"
FINISHED = (DONE, FAILED, CANCELLED, EXPIRED)
#: job priorities: 0 (low) to 2 (high); a job without one is 1
PRIORITIES = (0, 1, 2)
DEFAULT_PRIORITY = 1
SHUTTING_DOWN = "the server is shutting down"


@attrs.frozen
class ServedModel:
    """A model the server serves, under its public `name`."""

    name: str
    #: runs the jobs (in its device's worker thread only)
    engine: Engine
    #: the same weights (from the engine cache), checks and resolves requests in HTTP threads
    checker: Engine


def load_model(name: str, source: str, **load_kwargs: Any) -> ServedModel:
    """`t2i_core.load` `source` twice: the second engine comes from the cache and shares the weights."""
    from t2i_core import load

    engine = load(source, **load_kwargs)
    checker = load(source, **load_kwargs)
    return ServedModel(name=name, engine=engine, checker=checker)


async def relay(queue: asyncio.Queue[dict[str, Any]], heartbeat: float | None) -> AsyncIterator[dict[str, Any]]:
    """Each event put on `queue` until a job's final one (`FINISHED`), with a ``{"type": "heartbeat"}``
    after `heartbeat` quiet seconds (None: never)."""
    while True:
        try:
            event = await asyncio.wait_for(queue.get(), heartbeat)
        except asyncio.TimeoutError:
            event = {"type": "heartbeat"}
        yield event
        if event["type"] in FINISHED:
            return


@attrs.frozen(kw_only=True)
class JobOptions:
    """How a job is queued and reported, apart from what it makes (``priority``, ``webhook``, ...)."""

    #: 0 (low), 1 (normal) or 2 (high): higher runs first, FIFO within a priority
    priority: int = DEFAULT_PRIORITY
    #: an http(s) URL POSTed the job's JSON when it ends (signed; see `_webhooks`)
    webhook: str | None = None
    #: seconds the job may wait in the queue; past them it ends as ``expired`` without running
    max_queue_seconds: float | None = None


def _no_loader(name: str, _source: str) -> ServedModel:
    raise AssertionError(f"model {name} is not loaded and this service loads none")


class Job:
    """One submission: the resolved requests it runs in order, its state, its results and its listeners."""

    def __init__(
        self,
        *,
        model: ServedModel | None,
        requests: Sequence[GenerationRequest],
        kind: str,
        options: JobOptions | None = None,
        name: str | None = None,
    ) -> None:
        self.id = secrets.token_hex(8)
        #: the model it runs on; None while that model loads (`Service.submit_loading`)
        self.model: ServedModel = model  # type: ignore[assignment]
        #: the model's public name
        self.name = model.name if model is not None else str(name)
        self.requests = list(requests)
        #: "native" (``/v1``) or "a1111" (``/sdapi/v1``)
        self.kind = kind
        options = options or JobOptions()
        self.priority = options.priority
        self.webhook = options.webhook
        self.max_queue_seconds = options.max_queue_seconds
        #: the webhook's delivery: attempts, delivered, last error (None without a webhook)
        self.delivery: dict[str, Any] | None = None
        self.status = QUEUED
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.position: int | None = None
        self.step = 0
        self.total = sum(request.num_inference_steps or 0 for request in self.requests)
        self.results: list[GenerationResult] = []
        #: the error body of a failed job
        self.error: dict[str, Any] | None = None
        #: why a cancelled job was cancelled
        self.reason: str | None = None
        #: how many listeners asked for latent previews
        self.preview_watchers = 0
        self.latest_preview: dict[str, Any] | None = None
        self._last_preview = 0.0
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]], bool]] = []
        self._step_event: dict[str, Any] | None = None

    # -- results ----------------------------------------------------------------------------
    @property
    def images(self) -> list[Any]:
        return [image for result in self.results for image in result.images]

    @property
    def seeds(self) -> list[int]:
        return [seed for result in self.results for seed in result.seeds]

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/jobs`` lists: the state, without images."""
        summary: dict[str, Any] = {
            "id": self.id,
            "model": self.name,
            "kind": self.kind,
            "status": self.status,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "progress": {"step": self.step, "total": self.total},
            "seeds": self.seeds,
            "images": len(self.images),
        }
        summary["priority"] = self.priority
        if self.max_queue_seconds is not None:
            summary["max_queue_seconds"] = self.max_queue_seconds
        if self.status == QUEUED:
            summary["position"] = self.position
            if self.model is None:
                summary["loading"] = True  # its model loads first; then it is checked and queued
        if self.delivery is not None:
            summary["webhook"] = dict(self.delivery)
        if self.error is not None:
            summary["error"] = self.error
        if self.reason is not None:
            summary["reason"] = self.reason
        return summary

    # -- events -----------------------------------------------------------------------------
    def publish(self, event: dict[str, Any]) -> None:
        with self._lock:
            if event["type"] == "step":
                self._step_event = event
            listeners = list(self._listeners)
        for loop, queue, previews in listeners:
            if event["type"] == "preview" and not previews:
                continue
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the listener's loop is closed: it left
                self._drop(queue)

    def _drop(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        with self._lock:
            for listener in self._listeners:
                if listener[1] is queue:
                    self._listeners.remove(listener)
                    self.preview_watchers -= listener[2]
                    return

    def _current(self) -> list[dict[str, Any]]:
        """The events that tell a new listener where the job stands."""
        if self.status == QUEUED and self.model is None:
            return [{"type": "loading", "model": self.name}]
        if self.status == QUEUED:
            return [{"type": "queued", "position": self.position}]
        if self.status == RUNNING:
            events = [{"type": "started"}]
            if self._step_event is not None:
                events.append(self._step_event)
            return events
        return [self.final_event()]

    def final_event(self) -> dict[str, Any]:
        if self.status == DONE:
            return {"type": "done", "job": self.summary()}
        if self.status == FAILED:
            return {"type": "failed", "error": self.error, "job": self.summary()}
        if self.status == EXPIRED:
            return {"type": "expired", "reason": self.reason, "job": self.summary()}
        return {"type": "cancelled", "reason": self.reason, "job": self.summary()}

    async def events(self, *, previews: bool = False, heartbeat: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Where the job stands, then each event until it ends (the final event included).

        With `heartbeat`, a ``{"type": "heartbeat"}`` comes after that many quiet seconds.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        with self._lock:
            for event in self._current():
                queue.put_nowait(event)
            if previews and self.latest_preview is not None and self.status == RUNNING:
                queue.put_nowait(self.latest_preview)
            if not self.done:
                self._listeners.append((loop, queue, previews))
                self.preview_watchers += previews
        try:
            async for event in relay(queue, heartbeat):
                yield event
        finally:
            self._drop(queue)

    async def wait(self) -> None:
        """Until the job has ended."""
        async for _event in self.events():
            pass

    # -- state changes (from the worker, or a cancel) ----------------------------------------------------
    def cancel(self, reason: str) -> bool:
        """Ask the job to stop (at its next step if it runs); False if it has already ended."""
        with self._lock:
            if self.done:
                return False
            if self.reason is None:
                self.reason = reason
            self._cancel.set()
            return True

    @property
    def cancelling(self) -> bool:
        return self._cancel.is_set()

    def set_position(self, position: int) -> None:
        if position != self.position:
            self.position = position
            self.publish({"type": "queued", "position": position})

    def start(self) -> None:
        with self._lock:
            self.status = RUNNING
            self.started = time.time()
            self.position = None
        self.publish({"type": "started"})

    def finish(self, status: str, *, error: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.status = status
            self.error = error
            self.finished = time.time()
            if status == CANCELLED and self.reason is None:
                self.reason = "cancelled"
        self.publish(self.final_event())


class Service:
    """The served models, their workers, and every job not yet forgotten."""

    def __init__(
        self,
        models: Iterable[ServedModel],
        limits: Limits | None = None,
        *,
        controlnets: Iterable[str] = (),
        ip_adapters: Iterable[str] = (),
        allowed_options: Iterable[str] = (),
        webhook_secret: str | None = None,
        catalog: Models | None = None,
    ) -> None:
        #: every model this server may serve, loaded or not (`Models`: loads on demand, evicts under a cap)
        self.catalog = catalog or Models((), _no_loader)
        for model in models:
            if model.name in self.catalog.entries and self.catalog.entries[model.name].served is not None:
                raise ValueError(f"two models are served as {model.name!r}")
            self.catalog.add(model)
        if not self.catalog.entries:
            raise ValueError("a server needs at least one model")
        self.limits = limits or Limits()
        #: the ControlNets requests may name; no other is ever resolved
        self.controlnets = tuple(controlnets)
        #: the IP-Adapters image prompts may name; no other is ever resolved
        self.ip_adapters = tuple(ip_adapters)
        self.allowed_options = frozenset(allowed_options)
        #: the AUTOMATIC1111 settings POST /sdapi/v1/options stored (``CLIP_stop_at_last_layers``)
        self.a1111_settings: dict[str, Any] = {}
        self.metrics = Metrics()
        self.started = time.time()
        self.closing = False
        self._deadline: float | None = None
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keys = IdempotencyKeys(self.limits.idempotency_window)
        #: delivers the jobs' webhooks (signed with the secret); None: webhooks are refused
        self.webhooks = Webhooks(webhook_secret) if webhook_secret else None
        self._finished: deque[str] = deque()
        self._lock = threading.Lock()
        self.workers: dict[str, Worker] = {}
        self._started_workers = False
        for model in self.models.values():
            self._worker(model.engine.device)

    @property
    def models(self) -> dict[str, ServedModel]:
        """The loaded models by name (`names` lists every model, loaded or not)."""
        return self.catalog.resident()

    def names(self) -> list[str]:
        """Every model this server serves, loaded or not, in the order they were named."""
        return list(self.catalog.entries)

    @property
    def default_model(self) -> str:
        """The model requests get when they name none (``POST /sdapi/v1/options`` may change it)."""
        assert self.catalog.default is not None
        return self.catalog.default

    @default_model.setter
    def default_model(self, name: str) -> None:
        self.catalog.default = name

    def _worker(self, device: str) -> Worker:
        """The worker of `device`, made (and started, once the service runs) on its first model."""
        with self._lock:
            worker = self.workers.get(device)
            if worker is None:
                worker = self.workers[device] = Worker(device, self.limits.queue_size, self._run)
                if self._started_workers:
                    worker.start()
            return worker

    def start(self) -> None:
        with self._lock:
            self._started_workers = True
            for worker in self.workers.values():
                worker.start()

    # -- requests -----------------------------------------------------------------------------
    def model(self, name: str | None, field: str = "model") -> ServedModel:
        """The served model `name` (None = the default one)."""
        if name is None:
            name = self.default_model
        if name not in self.catalog.entries:
            allowed = ", ".join(repr(n) for n in self.catalog.entries)
            raise invalid(field, f"{field}={name!r} is not served here: expected one of {allowed}", allowed)
        try:
            served = self.catalog.get(name)  # loads it first if it is not loaded
        except T2IError as exc:
            raise from_t2i(exc) from None
        self._worker(served.engine.device)
        return served

    def check(self, served: ServedModel, request: GenerationRequest, fields: Mapping[str, str]) -> GenerationRequest:
        """`request` checked against the limits and resolved by the model (defaults filled in, the seed fixed).

        `fields` names t2i's request fields as the client's API calls them, for the errors.
        """

        def name(field: str) -> str:
            return fields.get(field, field)

        limits = self.limits
        if request.num_images > limits.max_images:
            raise invalid(
                name("num_images"),
                f"{name('num_images')}={request.num_images} is more images than this server makes per request",
                f"an integer in [1, {limits.max_images}]",
            )
        if len(request.controls) > limits.max_controls:
            raise invalid("controls", f"{len(request.controls)} controls", f"at most {limits.max_controls}")
        for index, control in enumerate(request.controls):
            if control.model not in self.controlnets:
                allowed = ", ".join(repr(c) for c in self.controlnets) or "none (the server serves no ControlNet)"
                raise invalid(
                    f"controls[{index}].model",
                    f"controls[{index}].model={control.model!r} is not served here",
                    f"one of {allowed}",
                )
        for index, prompt in enumerate(request.image_prompts):
            # Never a server path: an image prompt's image comes inline.
            if (
                prompt.model not in self.ip_adapters
                or isinstance(prompt.image, str)
                or hasattr(prompt.image, "__fspath__")
            ):
                allowed = ", ".join(repr(m) for m in self.ip_adapters) or "none (the server serves no IP-Adapter)"
                raise invalid(
                    f"image_prompts[{index}].model",
                    f"image_prompts[{index}].model={prompt.model!r} is not served here (or its image is not inline)",
                    f"one of {allowed}, with an inline image",
                )
        self._check_options(served, request)
        try:
            resolved, _options = served.checker.resolve(request)
        except T2IError as exc:
            raise from_t2i(exc, fields) from None
        assert resolved.height is not None and resolved.width is not None
        steps = resolved.num_inference_steps or 0
        if steps > limits.max_steps:
            given = "" if request.num_inference_steps else f" (the {served.engine.family} default)"
            raise invalid(
                name("num_inference_steps"),
                f"{name('num_inference_steps')}={steps}{given} is more steps than this server runs",
                f"an integer in [1, {limits.max_steps}]",
            )
        if resolved.height * resolved.width > limits.max_pixels:
            raise invalid(
                name("height"),
                f"{resolved.height}x{resolved.width} is more pixels than this server makes per image",
                f"height x width at most {limits.max_pixels} pixels",
            )
        if resolved.hires is not None:
            self._check_hires(resolved, name)
        return resolved

    def _check_hires(self, resolved: GenerationRequest, name: Callable[[str], str]) -> None:
        """Refuse a hires fix whose final size or second-pass steps pass this server's limits."""
        hires, limits = resolved.hires, self.limits
        assert hires is not None and resolved.width is not None and resolved.height is not None
        width, height = hires.size(resolved.width, resolved.height)
        if width * height > limits.max_pixels:
            field = name("hires.scale" if hires.width is None and hires.height is None else "hires.width")
            raise invalid(
                field,
                f"the hires fix's {width}x{height} is more pixels than this server makes per image",
                f"a final height x width of at most {limits.max_pixels} pixels",
            )
        if (hires.steps or 0) > limits.max_steps:
            field = name("hires.steps")
            raise invalid(
                field, f"{field}={hires.steps} is more steps than this server runs", f"at most {limits.max_steps}"
            )

    def _check_options(self, served: ServedModel, request: GenerationRequest) -> None:
        """Refuse free-text family options (a refiner, a prior: a path or hub id) unless allowed at start-up."""
        declared = {option.name: option for option in served.engine.provider.options}
        for key in request.options:
            option = declared.get(key)
            if option is None or key in self.allowed_options:
                continue  # an unknown name: the family refuses it, naming the known ones
            if option.type is str and option.choices is None:
                raise invalid(
                    f"options[{key!r}]",
                    f"option {key!r} is not settable through this server: a free-text option may name a "
                    "file or a model",
                    f"no {key!r} (the operator may allow it: t2i serve --allow-option {key})",
                )

    def job_options(self, priority: Any = None, webhook: Any = None, max_queue_seconds: Any = None) -> JobOptions:
        """The queueing fields of a submission, checked (errors name the field and what is allowed)."""
        if priority is None:
            priority = DEFAULT_PRIORITY
        if isinstance(priority, bool) or priority not in PRIORITIES:
            raise invalid("priority", f"priority={priority!r} is not allowed", "0 (low), 1 (normal) or 2 (high)")
        if webhook is not None:
            check_webhook_url(webhook, enabled=self.webhooks is not None)
        if max_queue_seconds is not None:
            number = isinstance(max_queue_seconds, (int, float)) and not isinstance(max_queue_seconds, bool)
            if not number or not math.isfinite(max_queue_seconds) or max_queue_seconds <= 0:
                raise invalid(
                    "max_queue_seconds", f"max_queue_seconds={max_queue_seconds!r} is not allowed", "a number > 0"
                )
            max_queue_seconds = float(max_queue_seconds)
        return JobOptions(priority=priority, webhook=webhook, max_queue_seconds=max_queue_seconds)

    def submit(
        self,
        served: ServedModel,
        requests: Sequence[GenerationRequest],
        kind: str,
        options: JobOptions | None = None,
        *,
        idempotency: tuple[str, str] | None = None,
    ) -> Job:
        """Queue a job of checked `requests` on `served`'s device; `Problem` 503 when full or closing.

        `idempotency` is (the client's ``Idempotency-Key``, a digest of what it asked): a key seen
        within `Limits.idempotency_window` seconds, for a job still kept, gives that job again (the
        same digest) or a 422 (another one).
        """
        job = Job(model=served, requests=requests, kind=kind, options=options)
        admitted = self._admit(job, idempotency, self._worker(served.engine.device))
        if admitted is job:
            self._start_deadline(job)
        return admitted

    def _admit(self, job: Job, idempotency: tuple[str, str] | None, worker: Worker | None) -> Job:
        """Register `job` (and queue it on `worker`, if given) unless its key gave an earlier job.

        `Problem` 503 when the server is closing or the queue is full; the job's model stays loaded
        until it ends.
        """
        with self._lock:
            if idempotency is not None:
                earlier = self._keys.earlier(idempotency, self._jobs)
                if earlier is not None:
                    return earlier
            if self.closing:
                self.metrics.rejected_job("shutting_down")
                raise Problem(503, "shutting_down", SHUTTING_DOWN, headers={"Retry-After": "30", "Connection": "close"})
            if worker is not None:
                self._put(worker, job)
            self._jobs[job.id] = job
            self.catalog.hold(job.name)  # never evicted while the job waits or runs
            if idempotency is not None:
                self._keys.remember(idempotency, job.id)
        return job

    def _put(self, worker: Worker, job: Job) -> None:
        try:
            worker.put(job)
        except QueueFull:
            self.metrics.rejected_job("queue_full")
            raise Problem(
                503,
                "queue_full",
                f"the queue of {worker.device} is full ({worker.capacity} jobs waiting); retry later",
                headers={"Retry-After": str(self.retry_after(worker))},
            ) from None

    def _start_deadline(self, job: Job) -> None:
        """Expire `job` if it is still queued when its ``max_queue_seconds`` (from its creation) have passed."""
        if job.max_queue_seconds is None:
            return
        left = job.max_queue_seconds - (time.time() - job.created)
        timer = threading.Timer(max(0.0, left), self._expire, (job,))
        timer.daemon = True
        timer.start()

    def _expire(self, job: Job) -> None:
        """End `job` as expired if it is still queued (its ``max_queue_seconds`` have passed)."""
        if job.status != QUEUED or job.max_queue_seconds is None or job.model is None:
            return
        if self.workers[job.model.engine.device].remove(job):
            self._finish_expired(job)

    def _finish_expired(self, job: Job) -> None:
        job.reason = f"it waited more than max_queue_seconds={job.max_queue_seconds:g} in the queue"
        self._finish(job, EXPIRED)

    def retry_after(self, worker: Worker) -> int:
        """Seconds a client should wait before retrying: about one job's time (1 to 60)."""
        return max(1, min(60, math.ceil(self.metrics.mean_latency() or 1.0)))

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def cancel(self, job: Job, reason: str = "cancelled by the client") -> bool:
        """Cancel a queued job at once, a running one at its next step; False if it has ended."""
        if not job.cancel(reason):
            return False
        if job.model is None:  # its model is loading: it never reaches a queue
            self._finish(job, CANCELLED)
        elif self.workers[job.model.engine.device].remove(job):
            self._finish(job, CANCELLED)
        return True

    def submit_loading(
        self,
        name: str,
        prepare: Callable[[], tuple[ServedModel, list[GenerationRequest]]],
        kind: str,
        options: JobOptions | None = None,
        *,
        idempotency: tuple[str, str] | None = None,
    ) -> Job:
        """A job on model `name`, which is not loaded: queued at once (state ``queued``, ``loading``),
        while a thread loads the model and `prepare` checks the request; then it joins its device's
        queue, or fails with the check's error (a field named, as a 422 would)."""
        job = Job(model=None, requests=(), kind=kind, options=options, name=name)
        admitted = self._admit(job, idempotency, None)
        if admitted is not job:
            return admitted
        job.publish({"type": "loading", "model": name})
        threading.Thread(
            target=self._load_then_queue, args=(job, prepare), name=f"t2i-load-{job.id}", daemon=True
        ).start()
        return job

    def _load_then_queue(self, job: Job, prepare: Callable[[], tuple[ServedModel, list[GenerationRequest]]]) -> None:
        try:
            served, requests = prepare()
            if job.done:  # cancelled while its model loaded
                return
            job.requests = requests
            job.total = sum(request.num_inference_steps or 0 for request in requests)
            job.model = served
            self._put(self._worker(served.engine.device), job)
        except Exception as exc:  # noqa: BLE001 - _error logs what is not a refusal
            error = self._error(job, exc, "loading the model of")
            if not job.done:
                self._finish(job, FAILED, error)
            return
        self._start_deadline(job)

    def running(self) -> list[Job]:
        return [worker.running for worker in self.workers.values() if worker.running is not None]

    # -- the worker's side --------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        if job.cancelling:
            self._finish(job, CANCELLED)
            return
        if job.max_queue_seconds is not None and time.time() - job.created > job.max_queue_seconds:
            self._finish_expired(job)  # its timer and the worker met: the deadline wins
            return
        job.start()
        engine = job.model.engine
        try:
            for index, request in enumerate(job.requests):
                if job.cancelling:
                    raise GenerationCancelled(job.reason or "cancelled")
                job.results.append(engine.generate(request, progress=self._progress(job, index)))
        except GenerationCancelled:
            self._finish(job, CANCELLED)
        except Exception as exc:  # noqa: BLE001 - _error logs what is not a refusal
            self._finish(job, FAILED, self._error(job, exc, "running"))
        else:
            self._finish(job, DONE)

    @staticmethod
    def _error(job: Job, exc: Exception, doing: str) -> dict[str, Any]:
        """The error body of a job that failed with `exc`: the field named for a refusal, else logged."""
        if isinstance(exc, Problem):
            return dict(exc.body()["error"])
        if isinstance(exc, T2IError):
            return dict(from_t2i(exc).body()["error"])
        logger.exception("t2i serve: %s job %s failed", doing, job.id)
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return {"type": "internal_error", "message": message}

    def _progress(self, job: Job, index: int) -> Callable[..., bool]:
        count = len(job.requests)
        family = job.model.engine.family

        def progress(step: int, total: int, latents: Any = None) -> bool:
            job.step, job.total = index * total + step, count * total
            self.metrics.step()
            job.publish({"type": "step", "step": job.step, "total": job.total})
            now = time.monotonic()
            if (
                latents is not None
                and job.preview_watchers > 0
                and now - job._last_preview >= self.limits.preview_interval
            ):
                job._last_preview = now
                self._preview(job, latents, family)
            return not job.cancelling

        return progress

    def _preview(self, job: Job, latents: Any, family: str) -> None:
        from ._preview import preview_png

        try:
            image, width, height = preview_png(latents, family)
        except Exception:
            logger.debug("t2i serve: no preview for job %s", job.id, exc_info=True)
            return
        event = {"type": "preview", "step": job.step, "image": image, "width": width, "height": height}
        job.latest_preview = event
        job.publish(event)

    def _finish(self, job: Job, status: str, error: dict[str, Any] | None = None) -> None:
        job.finish(status, error=error)
        self.catalog.release(job.name)
        self.metrics.finished(status, (job.finished or time.time()) - job.created, len(job.images))
        if job.webhook is not None and self.webhooks is not None:
            self.webhooks.deliver(job)
        with self._lock:
            self._finished.append(job.id)
            while len(self._finished) > self.limits.keep_jobs:
                self._jobs.pop(self._finished.popleft(), None)

    # -- shutting down ------------------------------------------------------------------------
    def begin_shutdown(self, timeout: float | None = None) -> None:
        """Accept no more jobs; cancel those not finished within `timeout` seconds (default: the limit)."""
        timeout = self.limits.shutdown_timeout if timeout is None else timeout
        with self._lock:
            if self.closing:
                return
            self.closing = True
            self._deadline = time.monotonic() + timeout
        threading.Thread(target=self._cancel_at_deadline, name="t2i-shutdown", daemon=True).start()

    def cancel_all(self) -> None:
        """Cancel every job not yet ended: queued ones at once, running ones at their next step."""
        for job in self.jobs():
            self.cancel(job, SHUTTING_DOWN)

    def _cancel_at_deadline(self) -> None:
        assert self._deadline is not None
        for worker in self.workers.values():
            worker.wait_idle(max(0.0, self._deadline - time.monotonic()))
        for job in self.jobs():
            self.cancel(job, SHUTTING_DOWN)

    def stop(self) -> None:
        """`begin_shutdown`, then wait for the workers to end (their last step, at worst)."""
        self.begin_shutdown()
        assert self._deadline is not None
        for worker in self.workers.values():
            worker.stop(max(0.0, self._deadline - time.monotonic()) + 60.0)
