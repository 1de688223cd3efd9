"""The ingress's record of each job submitted through it (``POST /v1/jobs``), fed by the job's stream.

A job lives on the replica that runs it; the ingress holds the one stream the replica sends about
it (events, then the final document and PNGs), so ``GET /v1/jobs/{id}``, ``/images/{i}`` and
``/events`` are answered by the ingress from this record, whichever replica ran the job, and
``DELETE`` closes the stream, which cancels the job on its replica. Everything here runs on the
ingress's event loop: no locks.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any


class RemoteJob:
    """What the ingress knows of a job: its document, its events so far, and once done its PNGs."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.id: str = document["id"]
        self.document = document
        self.images: list[bytes] = []
        self.final: dict[str, Any] | None = None
        self.cancelling = False
        #: the stream from the replica (a Ray Serve response generator)
        self.stream: Any = None
        self._started: dict[str, Any] | None = None
        self._step: dict[str, Any] | None = None
        self._listeners: list[tuple[asyncio.Queue[dict[str, Any]], bool]] = []

    @property
    def done(self) -> bool:
        return self.final is not None

    def summary(self) -> dict[str, Any]:
        return {key: value for key, value in self.document.items() if key not in ("request", "urls")}

    def publish(self, event: dict[str, Any]) -> None:
        """An event from the replica: the document follows it, and every listener gets it."""
        kind = event["type"]
        if kind == "queued":
            self.document["position"] = event.get("position")
        elif kind == "started":
            self._started = event
            self.document["status"] = "running"
            self.document.pop("position", None)
        elif kind == "step":
            self._step = event
            self.document["progress"] = {"step": event["step"], "total": event["total"]}
        for queue, previews in list(self._listeners):
            if kind != "preview" or previews:
                queue.put_nowait(event)

    def end(self, final: dict[str, Any], document: dict[str, Any] | None = None, images: Sequence[bytes] = ()) -> None:
        """The job has ended: its last document and PNGs first, then its final event to every listener."""
        if self.done:
            return
        self.images = list(images)
        if document is not None:
            self.document = {**self.document, **document}
        else:
            self.document["status"] = final["type"]
            self.document.pop("position", None)
            for key in ("error", "reason"):
                if key in final:
                    self.document[key] = final[key]
        self.final = {**final, "job": self.summary()}
        for queue, _previews in self._listeners:
            queue.put_nowait(self.final)

    def _current(self) -> list[dict[str, Any]]:
        if self.final is not None:
            return [self.final]
        if self._started is not None:
            return [self._started] + ([self._step] if self._step is not None else [])
        return [{"type": "queued", "position": self.document.get("position")}]

    async def events(self, *, previews: bool, heartbeat: float | None) -> AsyncIterator[dict[str, Any]]:
        """Where the job stands, then each event until its final one (heartbeats after quiet seconds)."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        for event in self._current():
            queue.put_nowait(event)
        listener = (queue, previews)
        self._listeners.append(listener)
        from t2i_server.embed import relay  # ends on every final event t2i serve sends

        try:
            async for event in relay(queue, heartbeat):
                yield event
        finally:
            self._listeners.remove(listener)


class JobBook:
    """Every job the ingress remembers: all unfinished ones and the last `keep` finished ones."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._jobs: OrderedDict[str, RemoteJob] = OrderedDict()

    def add(self, job: RemoteJob) -> None:
        self._jobs[job.id] = job
        finished = [key for key, known in self._jobs.items() if known.done]
        for key in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[key]

    def get(self, job_id: str) -> RemoteJob | None:
        return self._jobs.get(job_id)

    def all(self) -> list[RemoteJob]:
        return list(self._jobs.values())


async def follow(job: RemoteJob, stream: Any, retry_after: int) -> None:
    """Read the job's stream from its replica into `job` until it ends (or the replica is lost)."""
    from ray.exceptions import RayError

    try:
        async for item in stream:
            if item["type"] == "event":
                job.publish(item["event"])
            elif item["type"] == "end":
                job.end(item["event"] or {"type": "failed"}, item["document"], item["images"])
    except asyncio.CancelledError:
        pass
    except RayError as exc:
        if not job.cancelling:
            message = f"the replica running job {job.id} was lost ({type(exc).__name__}); submit it again"
            error = {"type": "replica_unavailable", "message": message, "retry_after": retry_after}
            job.end({"type": "failed", "error": error})
    finally:
        if job.cancelling:
            job.end({"type": "cancelled", "reason": "cancelled by the client"})
        elif not job.done:
            message = f"the stream of job {job.id} ended before the job did; submit it again"
            job.end({"type": "failed", "error": {"type": "replica_unavailable", "message": message}})
