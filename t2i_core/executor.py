"""Batch executors: where a batch's jobs run. The base class, what crosses to a worker and back, and the worker.

An executor gets `WorkItem`s (the jobs of one model, one or a micro-batch of them) and yields
an `Outcome` per job: its PNG files as bytes, or its error. It writes nothing: the driver
(`t2i_core.run_batch`) writes every file and the manifest, so the output is the same whichever
executor ran the jobs. A `Worker` runs items in one process, with one engine per model; the
``local`` executor runs one in-process, the ``ray`` executor one per Ray actor.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from .errors import GenerationCancelled, InvalidRequestError, T2IError

if TYPE_CHECKING:
    from .engine import Engine
    from .request import GenerationRequest, GenerationResult


def _as_dict(value: Mapping[str, Any]) -> dict[str, Any]:
    return dict(value)


@attrs.frozen(kw_only=True)
class ExecutorSettings:
    """How a batch asks its executor to run: the engines' settings, the workers, the executor's own options."""

    #: accelerator or preset names for every engine; None = the ``auto`` preset
    accelerators: tuple[str, ...] | None = None
    #: ``"auto"``, ``"cpu"``, ``"cuda"``...; an executor with workers on other machines may choose per worker
    device: str = "auto"
    #: how many workers (None = the executor's default)
    workers: int | None = None
    #: the executor's own settings, by name (`Executor.options` lists those it takes)
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_as_dict)


@attrs.frozen(kw_only=True)
class WorkItem:
    """Jobs on one model that a worker runs together: one job, or a micro-batch of compatible ones.

    Plain, picklable data: each job is its id and its request's fields (`GenerationRequest(**spec)`),
    its seed already set.
    """

    model: str
    family: str | None
    ids: tuple[str, ...]
    specs: tuple[dict[str, Any], ...]

    def requests(self) -> list[GenerationRequest]:
        """The jobs' requests."""
        from .request import GenerationRequest

        return [GenerationRequest(**spec) for spec in self.specs]


@attrs.frozen(kw_only=True)
class Outcome:
    """What a worker hands back for one job: its PNG files (with t2i's metadata), or its error."""

    id: str
    ok: bool
    #: the family the job ran as
    family: str | None = None
    #: the request as it ran (defaults filled in), as plain data; None when it never ran
    request: dict[str, Any] | None = None
    seeds: tuple[int, ...] = ()
    #: one PNG file's bytes per image, in order
    images: tuple[bytes, ...] = ()
    #: the error's class name and message when `ok` is false
    error_type: str | None = None
    error: str | None = None
    #: seconds: ``load_s`` (when this job loaded the model), ``generate_s`` (its share of a
    #: micro-batch), ``encode_s``
    timings: Mapping[str, float] = attrs.field(factory=dict)
    #: how many jobs ran in the same pipeline call as this one
    micro_batch: int = 1
    #: which worker ran it (``host:pid``, for logs)
    worker: str = ""


class Executor:
    """Base class of a batch executor. Subclass it, set `name`, implement `run`.

    Register an instance through the ``register_executors`` hook; users choose it by name
    (``run_batch(executor=...)``, ``t2i batch --executor``).
    """

    #: unique name (``--executor NAME``)
    name: ClassVar[str]
    #: one line for ``t2i plugins``
    description: ClassVar[str] = ""
    #: names of the executor's own settings (`ExecutorSettings.options`); any other is refused
    options: ClassVar[tuple[str, ...]] = ()

    def check(self, settings: ExecutorSettings) -> None:
        """Refuse settings the executor cannot honour, before any work: raise `InvalidRequestError`.

        The default refuses options not in `options` and a number of workers below 1.
        """
        for key in settings.options:
            if key not in self.options:
                allowed = ", ".join(self.options) or "none"
                raise InvalidRequestError("executor_options", key, f"an option of executor {self.name!r}: {allowed}")
        if settings.workers is not None and (
            not isinstance(settings.workers, int) or isinstance(settings.workers, bool) or settings.workers < 1
        ):
            raise InvalidRequestError("workers", settings.workers, "None or an integer >= 1")

    def run(self, items: Sequence[WorkItem], settings: ExecutorSettings) -> Iterator[Outcome]:
        """Run every item and yield one `Outcome` per job as each finishes, in any order.

        A job's failure is an `Outcome` with ``ok=False``; an exception from `run` ends the batch
        (the jobs already yielded are kept). `Worker` does a worker's part: ``Worker(...).run(item)``.
        """
        raise NotImplementedError


class Worker:
    """Runs work items in one process, with one engine per model, loaded when first needed and kept.

    Every failure of a job (a bad option, a model that cannot load, an exception in the pipeline)
    becomes that job's failed `Outcome`; a micro-batch that fails is run again job by job, so
    one bad job does not fail the others. Interrupts (``KeyboardInterrupt``) are not caught.
    """

    def __init__(self, *, accelerators: Sequence[str] | None = None, device: str = "auto", name: str | None = None):
        self.accelerators = None if accelerators is None else tuple(accelerators)
        self.device = device
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._engines: dict[tuple[str, str | None], Engine | Exception] = {}

    def engine(self, model: str, family: str | None) -> tuple[Engine, float]:
        """The engine for `model` (loaded on first use) and the seconds this call spent loading it."""
        from .engine import load

        key = (model, family)
        seconds = 0.0
        if key not in self._engines:
            started = time.perf_counter()
            try:
                self._engines[key] = load(model, family=family, device=self.device, accelerators=self.accelerators)
            except Exception as exc:  # noqa: BLE001 - recorded against each job of the model, not retried per job
                self._engines[key] = exc
            seconds = time.perf_counter() - started
        engine = self._engines[key]
        if isinstance(engine, Exception):
            raise engine
        return engine, seconds

    def run(self, item: WorkItem, *, stop: threading.Event | None = None) -> list[Outcome]:
        """Every job of `item`, made and encoded: one `Outcome` each, in order.

        When `stop` is set, the generation under way is cancelled and nothing is returned for it.
        """
        progress = None if stop is None else (lambda _step, _total: not stop.is_set())
        try:
            engine, load_s = self.engine(item.model, item.family)
            requests = item.requests()
        except Exception as exc:  # noqa: BLE001 - the model cannot load, or a request is refused
            return [self._failed(job_id, exc) for job_id in item.ids]
        if len(requests) > 1:
            try:
                started = time.perf_counter()
                results = engine.generate_batch(requests, progress=progress)
                share = (time.perf_counter() - started) / len(results)
                return [
                    self._made(job_id, result, share, load_s if index == 0 else 0.0, len(results))
                    for index, (job_id, result) in enumerate(zip(item.ids, results, strict=True))
                ]
            except GenerationCancelled:
                if stop is not None and stop.is_set():
                    return []
            except Exception:  # noqa: BLE001 - run each job alone, so that only the culprit fails
                pass
        outcomes = []
        for index, (job_id, request) in enumerate(zip(item.ids, requests, strict=True)):
            try:
                started = time.perf_counter()
                result = engine.generate(request, progress=progress)
                outcomes.append(
                    self._made(job_id, result, time.perf_counter() - started, load_s if index == 0 else 0.0, 1)
                )
            except GenerationCancelled as exc:
                if stop is not None and stop.is_set():
                    return outcomes
                outcomes.append(self._failed(job_id, exc))
            except Exception as exc:  # noqa: BLE001 - a failing job is recorded; the batch goes on
                outcomes.append(self._failed(job_id, exc))
        return outcomes

    def _made(self, job_id: str, result: GenerationResult, generate_s: float, load_s: float, batched: int) -> Outcome:
        from ._jobs import describe_request

        started = time.perf_counter()
        images = tuple(result.png(index) for index in range(len(result.images)))
        timings = {"generate_s": round(generate_s, 4), "encode_s": round(time.perf_counter() - started, 4)}
        if load_s:
            timings["load_s"] = round(load_s, 4)
        return Outcome(
            id=job_id,
            ok=True,
            family=result.family,
            request=describe_request(result.request),
            seeds=tuple(result.seeds),
            images=images,
            timings=timings,
            micro_batch=batched,
            worker=self.name,
        )

    def _failed(self, job_id: str, exc: Exception) -> Outcome:
        message = str(exc) if isinstance(exc, T2IError) or str(exc) else type(exc).__name__
        return Outcome(
            id=job_id,
            ok=False,
            error_type=type(exc).__name__,
            error=message.splitlines()[0] if message else "",
            worker=self.name,
        )
