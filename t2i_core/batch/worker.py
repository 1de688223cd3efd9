"""`Worker`: runs batch work items in one process, with one engine per model (every executor's worker part)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import GenerationCancelled, T2IError
from ..executor import Outcome, WorkItem

if TYPE_CHECKING:
    from ..engine import Engine
    from ..request import GenerationResult


class Worker:
    """Runs work items in one process, with one engine per model, loaded when first needed and kept.

    Every failure of a job (a bad option, a model that cannot load, an exception in the pipeline)
    becomes that job's failed `Outcome`; a micro-batch that fails is run again job by job, so
    one bad job does not fail the others. Interrupts (``KeyboardInterrupt``) are not caught.
    """

    def __init__(self, *, accelerators: Sequence[str] | None = None, device: str = "auto", name: str | None = None):
        self.accelerators = None if accelerators is None else tuple(accelerators)
        """The accelerator or preset names of every engine it loads; None: the ``auto`` preset."""
        self.device = device
        """The device its engines load on (``auto``, ``cpu``, ``cuda``...)."""
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        """Its name in `Outcome.worker` and logs: ``host:pid`` unless given."""
        self._engines: dict[tuple[str, str | None], Engine | Exception] = {}

    def engine(self, model: str, family: str | None) -> tuple[Engine, float]:
        """The engine for `model` (loaded on first use) and the seconds this call spent loading it."""
        from ..engine import load

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
        from .jobs import describe_request  # the jobs-file reader loads with the first image, not with the executors

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
