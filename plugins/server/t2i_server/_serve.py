"""``t2i serve``: load the models (with progress on the terminal), then run uvicorn until Ctrl-C or SIGTERM.

On SIGTERM the server stops accepting connections and jobs, lets queued and running jobs finish
for ``--shutdown-timeout`` seconds, cancels what is left (at its next step), and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

from t2i_core import InvalidRequestError

from . import TOKEN_ENV, WEBHOOK_SECRET_ENV
from ._jobs import ServedModel, Service, load_model
from ._limits import Limits
from ._models import NAME, ModelEntry, Models, parse_size, scan_folder

_NAME = NAME


def serve(args: argparse.Namespace) -> int:
    """Run the server that `args` describe; the exit status."""
    specs = [_model_spec(text) for text in args.model or ()]
    max_memory = parse_size(args.max_memory) if getattr(args, "max_memory", None) else None
    for folder in getattr(args, "models_dir", None) or ():
        specs += [(name, source) for name, source in scan_folder(folder, allow_pickle=args.allow_pickle).items()]
    if not specs:
        raise InvalidRequestError(
            "--model", None, "a model to serve: --model MODEL, or --models-dir DIR with models in it"
        )
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    limits = Limits(
        max_pixels=args.max_pixels,
        max_steps=args.max_steps,
        max_images=args.max_images,
        max_body_bytes=args.max_body_bytes,
        max_control_pixels=args.max_control_pixels,
        queue_size=args.queue_size,
        keep_jobs=args.keep_jobs,
        shutdown_timeout=args.shutdown_timeout,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
    )
    if token is not None and not token.strip():
        raise InvalidRequestError("--token", token, "a non-empty token")
    folders = _folders(args)
    sock = _bind(args.host, args.port)  # before loading: a port in use is a one-line error at once
    _quiet_libraries()

    def loader(name: str, source: str) -> ServedModel:
        served = load_model(
            name, source, device=args.device, accelerators=args.accelerator, allow_pickle=args.allow_pickle
        )
        _use_folders([served], *folders)
        return served

    catalog = Models(specs, loader, max_memory=max_memory, pinned=getattr(args, "pin", None) or ())
    named = {name for name, _source in _model_specs(args)}
    _load(catalog, [e for e in catalog.entries.values() if e.name in named or e.pinned or e.name == catalog.default])
    service = Service(
        (),
        limits,
        catalog=catalog,
        controlnets=args.controlnet,
        ip_adapters=args.ip_adapter,
        allowed_options=args.allow_option,
        webhook_secret=_webhook_secret(args),
    )
    _load_controlnets(service, args.controlnet)
    _load_ip_adapters(service, args.ip_adapter)

    from ._app import create_app

    app = create_app(service, token=token)
    server = _Server(server_config(app, limits), service)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(host) and token is None:
        print(
            f"t2i: warning: serving on {host} without --token: anyone who can reach this port can use it",
            file=sys.stderr,
        )
    print(
        f"t2i serve: serving {', '.join(service.names())} on http://{shown}:{port}/ "
        f"(API: /openapi.json{', bearer token required' if token else ''}); Ctrl-C or SIGTERM stops it",
        file=sys.stderr,
        flush=True,
    )
    server.run(sockets=[sock])
    if server.force_exit or server.stopped_now:
        return 130
    print("t2i serve: stopped", file=sys.stderr)
    return 0 if server.started else 1


def _webhook_secret(args: argparse.Namespace) -> str | None:
    """``--webhook-secret`` (or ``$T2I_WEBHOOK_SECRET``); at least 16 characters, or webhooks stay off."""
    secret = args.webhook_secret if args.webhook_secret is not None else os.environ.get(WEBHOOK_SECRET_ENV) or None
    if secret is not None and len(secret) < 16:
        raise InvalidRequestError("--webhook-secret", "<not shown>", "a secret of at least 16 characters")
    return secret


def server_config(app: Any, limits: Limits) -> uvicorn.Config:
    """uvicorn's settings for `app` under `limits` (the tests serve with the same)."""
    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(limits.shutdown_timeout) + 10,
        limit_concurrency=limits.max_connections,
        # The server answers errors itself; uvicorn's own header would only advertise the stack.
        server_header=False,
    )


def _model_spec(text: str) -> tuple[str, str]:
    """``[NAME=]MODEL`` -> (the public name, the model to load)."""
    name, sep, source = text.partition("=")
    if sep and _NAME.match(name) and source:
        return name, source
    if not text.strip():
        raise InvalidRequestError("--model", text, "[NAME=]MODEL: a hub id, local folder, alias or tiny:<family>")
    return text, text


def _folders(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``--lora-dir`` and ``--embeddings-dir``, each an existing folder (checked before anything loads)."""
    given = []
    for flag, dest in (("--lora-dir", "lora_dirs"), ("--embeddings-dir", "embedding_dirs")):
        folders = tuple(getattr(args, dest, None) or ())
        for folder in folders:
            if not os.path.isdir(os.path.expanduser(folder)):
                raise InvalidRequestError(flag, folder, "an existing folder")
        given.append(folders)
    return given[0], given[1]


def _use_folders(models: list[ServedModel], lora_dirs: tuple[str, ...], embedding_dirs: tuple[str, ...]) -> None:
    """Every served engine reads the prompts' tags and embedding words from the same folders (else the environment's)."""
    for served in models:
        for engine in (served.engine, served.checker):
            if lora_dirs:
                engine.lora_dirs = lora_dirs
            if embedding_dirs:
                engine.embedding_dirs = embedding_dirs


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
    # that say they are TCP; with proto 0, every answer waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as exc:  # a name that resolves to no address: the host is wrong, not the port
        sock.close()
        raise InvalidRequestError(
            "--host", host, f"an address or host name of this machine ({exc.strerror or exc})"
        ) from None
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            raise InvalidRequestError("--host", host, "an address of this machine (it has no such address)") from None
        raise InvalidRequestError("--port", port, f"a port free on {host} ({exc.strerror or exc})") from None
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _model_specs(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [_model_spec(text) for text in args.model or ()]


def _load(catalog: Models, entries: list[ModelEntry]) -> None:
    """Load the models named by ``--model`` and ``--pin`` (and the default one) now, with progress."""
    for index, entry in enumerate(entries, start=1):
        shown = entry.source if entry.name == entry.source else f"{entry.source} as {entry.name}"
        print(f"t2i serve: loading {shown} ({index} of {len(entries)}) ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        engine = catalog.get(entry.name).engine
        accelerators = ", ".join(engine.accelerators) or "none"
        print(
            f"t2i serve: loaded {entry.name}: {engine.family} on {engine.device} (accelerators: {accelerators}) "
            f"in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    waiting = len(catalog.entries) - len(entries)
    if waiting:
        print(f"t2i serve: {waiting} more model(s) load when a request first names them", file=sys.stderr, flush=True)


def _load_controlnets(service: Service, controlnets: list[str]) -> None:
    """Load each ControlNet into every served model it fits, with a one-step generation (so no request waits)."""
    from PIL import Image

    from t2i_core import Control

    def with_control(controlnet: str, served: ServedModel) -> dict[str, Any]:
        height, width = served.engine.provider.native_size(served.engine.pipeline)
        return {"controls": (Control(image=Image.new("RGB", (width, height)), model=controlnet),)}

    _warm_up(service, controlnets, "ControlNet", "--controlnet", with_control)


def _load_ip_adapters(service: Service, adapters: list[str]) -> None:
    """Load each IP-Adapter into every served model it fits, with a one-step generation (so no request waits)."""
    from PIL import Image

    from t2i_core import ImagePrompt

    def with_image_prompt(adapter: str, _served: ServedModel) -> dict[str, Any]:
        return {"image_prompts": (ImagePrompt(image=Image.new("RGB", (64, 64)), model=adapter),)}

    _warm_up(service, adapters, "IP-Adapter", "--ip-adapter", with_image_prompt)


def _warm_up(
    service: Service,
    models: list[str],
    kind: str,
    flag: str,
    fields: Callable[[str, ServedModel], dict[str, Any]],
) -> None:
    """Load each of `models` (ControlNets, IP-Adapters) into every loaded model it fits, by a one-step
    generation with the request `fields` it names; refuse `flag`'s value when it fits none."""
    from t2i_core import GenerationRequest, T2IError

    for model in models:
        print(f"t2i serve: loading {kind} {model} ...", file=sys.stderr, flush=True)
        fits = []
        for name, served in service.models.items():
            request = GenerationRequest(prompt="warm-up", num_inference_steps=1, seed=0, **fields(model, served))
            try:
                served.checker.resolve(request)
                served.engine.generate(request)
            except T2IError:
                continue  # another family's: requests naming it on this model get a 422
            fits.append(name)
        if not fits:
            article = "an" if kind[0] in "AEIOU" else "a"
            raise InvalidRequestError(flag, model, f"{article} {kind} that fits one of the served models")
        print(f"t2i serve: {kind} {model} serves {', '.join(fits)}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    """No loading bars or notices from the libraries: the server prints its own progress."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


class _Server(uvicorn.Server):
    """uvicorn's server, told about shutdowns first, and ending with exit status 0 on SIGTERM.

    uvicorn re-raises a caught SIGTERM once it has shut down, which would end the process *by* the
    signal; a server that drained its jobs has done what SIGTERM asked, so it exits normally.
    """

    def __init__(self, config: Any, service: Service) -> None:
        super().__init__(config)
        self.service = service
        #: connections not in a request (none yet, or between two), by id: since when
        self._quiet_since: dict[int, float] = {}
        #: a second Ctrl-C stopped the server without letting the jobs finish (exit status 130)
        self.stopped_now = False

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0:  # once a second
            self.close_stalled(time.monotonic())
        return bool(await super().on_tick(counter))

    def close_stalled(self, now: float) -> None:
        """Close the connections that have sent no complete request for `Limits.header_timeout` seconds.

        A client that connects and sends nothing, or a request's head a byte at a time, would hold a
        connection slot for ever (uvicorn times out only idle keep-alive connections, after an answer).
        """
        limit = self.service.limits.header_timeout
        quiet: dict[int, float] = {}
        for protocol in list(self.server_state.connections):
            cycle = getattr(protocol, "cycle", None)
            if cycle is not None and not cycle.response_complete:
                continue  # in a request: its handler, not this, decides how long it takes
            since = quiet[id(protocol)] = self._quiet_since.get(id(protocol), now)
            if now - since > limit:
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.close()
        self._quiet_since = quiet

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.service.closing and sig == signal.SIGINT:
            # A second Ctrl-C: stop now, cancelling what runs (at its next step).
            print("t2i serve: stopping now (second Ctrl-C): running jobs are cancelled", file=sys.stderr, flush=True)
            self.service.begin_shutdown(0)
            self.service.cancel_all()
            self.stopped_now = True
            self.should_exit = True  # uvicorn's own shutdown: quick now that nothing runs, and no traceback
            return
        if self.service.closing:
            return
        busy = sum(len(worker) for worker in self.service.workers.values()) + len(self.service.running())
        print(
            f"t2i serve: stopping ({signal.Signals(sig).name}): no new jobs; {busy} job(s) get up to "
            f"{self.service.limits.shutdown_timeout:g} s to finish",
            file=sys.stderr,
            flush=True,
        )
        self.service.begin_shutdown()
        # Connections stay open while the jobs drain, so that /healthz says 503 and new work is
        # refused with a 503 (not a refused connection); then uvicorn closes and exits.
        threading.Thread(target=self._exit_when_drained, name="t2i-drain", daemon=True).start()

    def _exit_when_drained(self) -> None:
        deadline = time.monotonic() + self.service.limits.shutdown_timeout + 5.0
        for worker in list(self.service.workers.values()):
            worker.wait_idle(max(0.0, deadline - time.monotonic()))
        self.should_exit = True
