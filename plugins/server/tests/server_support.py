"""Helpers of the server tests: a real uvicorn server on an ephemeral loopback port, in a thread."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

#: every wait of these tests is bounded: a server that hangs fails the test instead of the suite
STARTUP_SECONDS = 60.0


@contextlib.contextmanager
def running_server(service: Any, *, token: str | None = None) -> Iterator[str]:
    """Serve `service` with uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    from t2i_server._app import create_app
    from t2i_server._serve import _Server, server_config

    app = create_app(service, token=token)
    server = _Server(server_config(app, service.limits), service)  # the server and settings t2i serve runs
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY: see t2i_server._serve
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        service.begin_shutdown(0)  # what a test left running is cancelled at once
        server.should_exit = True
        thread.join(60)
        sock.close()


def decode_png(data: str | bytes) -> Any:
    """A base64 string (or raw bytes) of a PNG as a loaded PIL image."""
    from PIL import Image

    raw = base64.b64decode(data) if isinstance(data, str) else data
    image = Image.open(io.BytesIO(raw))
    image.load()
    return image


def png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def wait_until(predicate: Any, seconds: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.02)
