"""The model replicas of ``t2i serve --ray``: each runs ``t2i serve``'s own application in-process.

A replica loads the models its requests name through Ray Serve's model multiplexing (its own
LRU of at most ``--models-per-replica``); each loaded model is a one-model t2i-server `Service`
with its worker thread, and its FastAPI application is called directly (ASGI, no socket). The
ingress hands a replica a `Forwarded` HTTP request and gets the ASGI messages back as a stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import attrs

logger = logging.getLogger("t2i.ray.serve")

Message = MutableMapping[str, Any]
#: the cancellations a closed job stream started (kept until they end)
_pending: set[asyncio.Future[Any]] = set()


@attrs.frozen
class Forwarded:
    """An HTTP request as the ingress received it (the token already checked)."""

    method: str
    path: str
    query: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


async def call_app(app: Callable[..., Awaitable[None]], request: Forwarded) -> AsyncIterator[Message]:
    """The ASGI messages `app` sends for `request`. Closing the iterator early tells the app that its
    client disconnected (a synchronous generation then cancels its job, as over a socket)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query,
        "root_path": "",
        "headers": [(b"host", b"t2i-replica"), *request.headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }
    disconnected = asyncio.Event()
    body_sent = False
    messages: asyncio.Queue[Message | None] = asyncio.Queue()

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # the app has answered 500 already (Starlette's outermost layer)
            logger.exception("t2i serve --ray: %s %s failed in the replica", request.method, request.path)
        finally:
            messages.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await messages.get()) is not None:
            yield message
    finally:
        disconnected.set()  # the app ends by itself (a generation notices at its next poll)
        if task.done():
            task.result()


async def answer(app: Callable[..., Awaitable[None]], request: Forwarded) -> tuple[int, dict[str, str], bytes]:
    """The whole answer of `app` to `request`: status, headers, body."""
    status, headers, body = 500, {}, b""
    async for message in call_app(app, request):
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")
    return status, headers, body


def sse_events(chunks: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """The events of the complete Server-Sent Events in `chunks`, and the incomplete rest."""
    events = []
    *complete, rest = chunks.split(b"\n\n")
    for block in complete:
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
    return events, rest


class LoadedModel:
    """One model of a replica: a one-model `Service` (its worker started) and its application."""

    def __init__(self, service: Any) -> None:
        from t2i_server.embed import create_app

        self.service = service
        self.app = create_app(service)  # its lifespan never runs: the worker starts here
        service.start()
        self._stopped = False

    def __del__(self) -> None:
        """Serve's multiplexer calls this when it evicts the model: its jobs finish, then its memory goes."""
        if getattr(self, "_stopped", True):
            return
        self._stopped = True
        threading.Thread(target=self._stop, name="t2i-evict", daemon=True).start()

    def _stop(self) -> None:
        from t2i_core import clear_cache

        self.service.stop()
        clear_cache()


def replica_class(models_per_replica: int) -> type:
    """The replica deployment's class, its multiplexing bound to `models_per_replica` models."""
    from ray import serve

    multiplexed: Any = serve.multiplexed  # untyped in ray

    class Models:
        """A replica: the models it has loaded (LRU), each served by t2i serve's application."""

        def __init__(self, args: argparse.Namespace, sources: dict[str, str], threads: int | None) -> None:
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
            self.args = args
            self.sources = sources

        @multiplexed(max_num_models_per_replica=models_per_replica)  # type: ignore[untyped-decorator]
        async def model(self, name: str) -> LoadedModel:
            from t2i_server.embed import one_model_service

            service = await asyncio.to_thread(one_model_service, self.args, name, self.sources[name])
            return LoadedModel(service)

        async def _loaded(self) -> LoadedModel | tuple[int, bytes]:
            """The request's model, loaded (or already); a 500 naming the model and why when it cannot load."""
            name = serve.get_multiplexed_model_id()
            try:
                loaded: LoadedModel = await self.model(name)
            except Exception as exc:  # its exception may not pickle: the ingress gets the message
                logger.exception("t2i serve --ray: model %s cannot load", name)
                why = str(exc).strip().splitlines()
                message = f"model {name!r} cannot load on this replica: {type(exc).__name__}: {why[0] if why else ''}"
                return 500, json.dumps({"error": {"type": "model_unavailable", "message": message}}).encode()
            return loaded

        async def request(self, request: Forwarded) -> AsyncIterator[Message]:
            """The ASGI messages of the model's application for `request` (a stream)."""
            loaded = await self._loaded()
            if isinstance(loaded, tuple):
                yield {
                    "type": "http.response.start",
                    "status": loaded[0],
                    "headers": [(b"content-type", b"application/json")],
                }
                yield {"type": "http.response.body", "body": loaded[1]}
                return
            async for message in call_app(loaded.app, request):
                if message["type"] == "http.response.start":
                    headers = [*message.get("headers", []), (b"x-t2i-replica", _replica_name().encode())]
                    message = {**message, "headers": headers}
                yield message

        async def job(self, request: Forwarded) -> AsyncIterator[dict[str, Any]]:
            """A submission (``POST /v1/jobs``) and then its life, as a stream.

            First ``{"type": "answer", ...}`` (the 202, or the error), then an ``event`` for each of the
            job's events but the last, then ``{"type": "end", "event", "document", "images"}``.
            Closing the stream early cancels the job.
            """
            loaded = await self._loaded()
            if isinstance(loaded, tuple):
                yield {"type": "answer", "status": loaded[0], "headers": {}, "body": loaded[1]}
                return
            status, headers, body = await answer(loaded.app, request)
            headers["x-t2i-replica"] = _replica_name()
            yield {"type": "answer", "status": status, "headers": headers, "body": body}
            if status != 202:
                return
            from t2i_server.embed import FINISHED

            job_id = json.loads(body)["id"]
            base = f"/v1/jobs/{job_id}"
            final: dict[str, Any] | None = None
            try:
                rest = b""
                async for message in call_app(loaded.app, Forwarded("GET", f"{base}/events", b"previews=true")):
                    events, rest = sse_events(rest + message.get("body", b""))
                    for event in events:
                        if event["type"] in FINISHED:  # done, failed, cancelled, expired
                            final = event
                        else:
                            yield {"type": "event", "event": event}
            finally:
                if final is None:  # the ingress closed the stream: DELETE, or the ingress went away
                    cancel = asyncio.ensure_future(answer(loaded.app, Forwarded("DELETE", base)))
                    _pending.add(cancel)
                    cancel.add_done_callback(_pending.discard)
            _status, _headers, body = await answer(loaded.app, Forwarded("GET", base))
            document = json.loads(body)
            count = document.get("images")
            images = []
            for index in range(count if isinstance(count, int) else len(document.get("seeds") or ())):
                _status, _headers, png = await answer(loaded.app, Forwarded("GET", f"{base}/images/{index}"))
                images.append(png)
            yield {"type": "end", "event": final, "document": document, "images": images}

    return Models


def _replica_name() -> str:
    """This replica's actor name (namespace ``serve``): the ``X-T2I-Replica`` header of its answers."""
    from ray import serve

    name: str = serve.get_replica_context().replica_id.to_full_id_str()
    return name
