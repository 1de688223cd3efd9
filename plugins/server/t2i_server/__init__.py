"""t2i plugin: ``t2i serve``, an HTTP server over the models named at start-up.

This module only declares the command (``register_commands``); FastAPI, uvicorn and torch are
imported when the command runs (`t2i_server._serve`), so ``t2i --help`` stays instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from t2i_core import hookimpl

from ._limits import Limits

if TYPE_CHECKING:
    from t2i_core import Commands

__all__ = ["Limits", "register_commands"]

#: The environment variable that sets the bearer token when ``--token`` is not given.
TOKEN_ENV = "T2I_SERVER_TOKEN"
#: The environment variable that sets the webhook secret when ``--webhook-secret`` is not given.
WEBHOOK_SECRET_ENV = "T2I_WEBHOOK_SECRET"


@hookimpl
def register_commands(cli: Commands) -> None:
    serve = cli.command(
        "serve",
        run=_run,
        help="serve models over HTTP (AUTOMATIC1111-compatible and native API, and a page)",
        description="Load the models named by --model, then serve them over HTTP until Ctrl-C or SIGTERM: "
        "AUTOMATIC1111's /sdapi/v1/txt2img, the native /v1/generations and /v1/jobs with progress events, "
        "/healthz, /metrics and a page at /. Clients can use only these models. See docs/serving.md.",
    )
    defaults = Limits()
    serve.add_argument(
        "--model",
        "-m",
        action="append",
        default=None,
        metavar="[NAME=]MODEL",
        help="a model to serve (repeatable): hub id, local folder, alias or tiny:<family>; NAME= publishes it "
        "under another name (e.g. to keep a local path private); the first is the default model",
    )
    serve.add_argument(
        "--models-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="serve every model in DIR (repeatable): diffusers folders by folder name, single files "
        "(.safetensors, .gguf) by file name; each loads when a request first names it",
    )
    serve.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="bytes of model weights kept loaded per device (512MiB, 12GB, ...): past it, the least recently "
        "used idle model is evicted before another loads (default: no limit)",
    )
    serve.add_argument(
        "--pin",
        action="append",
        default=None,
        metavar="NAME",
        help="a model loaded at start and never evicted (repeatable)",
    )
    serve.add_argument(
        "--accelerator",
        action="append",
        default=None,
        metavar="NAME[@VALUE]",
        help="accelerator or preset (repeatable); NAME@VALUE gives an accelerator its value: first-block-cache@0.15",
    )
    serve.add_argument("--device", default="auto", help='"auto" (cuda > mps > cpu), cpu, cuda, cuda:N, mps')
    serve.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="MODEL",
        help="a ControlNet that requests may name in controls (repeatable); no other is ever loaded",
    )
    serve.add_argument(
        "--ip-adapter",
        dest="ip_adapter",
        action="append",
        default=[],
        metavar="MODEL",
        help="an IP-Adapter that requests may name in image_prompts (repeatable; needs t2i-ipadapter): hub id, "
        "folder, weights file or tiny:ip-adapter-<family>; no other is ever loaded",
    )
    serve.add_argument(
        "--lora-dir",
        dest="lora_dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of LoRAs that prompts name with <lora:NAME:WEIGHT> (repeatable; default: $T2I_LORA_DIR); "
        "GET /sdapi/v1/loras lists them",
    )
    serve.add_argument(
        "--embeddings-dir",
        dest="embedding_dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of embeddings: a prompt word equal to a file's name uses it (repeatable; "
        "default: $T2I_EMBEDDINGS_DIR)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this machine only)"
    )
    serve.add_argument(
        "--port", type=_count(0, 65535), default=7860, help="the port (default: 7860; 0 = any free port)"
    )
    serve.add_argument(
        "--token",
        default=None,
        metavar="T",
        help=f"require 'Authorization: Bearer T' on every endpoint but /healthz (default: ${TOKEN_ENV})",
    )
    limits = serve.add_argument_group("limits (each request is refused with a 4xx error naming the field)")
    limits.add_argument(
        "--max-pixels", type=_count(64), default=defaults.max_pixels, metavar="N", help="height x width of an image"
    )
    limits.add_argument("--max-steps", type=_count(1), default=defaults.max_steps, metavar="N", help="denoising steps")
    limits.add_argument(
        "--max-images",
        type=_count(1),
        default=defaults.max_images,
        metavar="N",
        help="images per request (AUTOMATIC1111: batch_size x n_iter)",
    )
    limits.add_argument(
        "--max-body-bytes",
        type=_count(1024),
        default=defaults.max_body_bytes,
        metavar="N",
        help="size of a request body (413 beyond it)",
    )
    limits.add_argument(
        "--max-control-pixels",
        type=_count(64),
        default=defaults.max_control_pixels,
        metavar="N",
        help="height x width of a control image, checked before it is decoded",
    )
    limits.add_argument(
        "--queue-size",
        type=_count(1),
        default=defaults.queue_size,
        metavar="N",
        help="jobs waiting per device (503 with Retry-After beyond it)",
    )
    limits.add_argument(
        "--keep-jobs",
        type=_count(1),
        default=defaults.keep_jobs,
        metavar="N",
        help="finished jobs kept for GET /v1/jobs/{id}, with their images",
    )
    limits.add_argument(
        "--max-connections",
        type=_count(1),
        default=defaults.max_connections,
        metavar="N",
        help="open connections at once (503 beyond them)",
    )
    limits.add_argument(
        "--header-timeout",
        type=_seconds,
        default=defaults.header_timeout,
        metavar="S",
        help="seconds a connection may go without sending a complete request before it is closed",
    )
    limits.add_argument(
        "--allow-option",
        action="append",
        default=[],
        metavar="NAME",
        help="let clients set this free-text family option (refused by default: one may name a file or model)",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=_seconds,
        default=defaults.shutdown_timeout,
        metavar="S",
        help="on SIGTERM, seconds to let queued and running jobs finish before cancelling them",
    )
    serve.add_argument(
        "--webhook-secret",
        default=None,
        metavar="SECRET",
        help="enable job webhooks, each POST signed with HMAC-SHA256 under SECRET (X-T2I-Signature); "
        f"default: ${WEBHOOK_SECRET_ENV}; without one, jobs naming a webhook are refused",
    )
    serve.add_argument("--allow-pickle", action="store_true", help="also load .bin (pickle) weights")
    _ray_flags(serve)


def _ray_flags(serve: argparse.ArgumentParser) -> None:
    """``--ray``: the same API as a Ray Serve application (t2i-ray runs it; this plugin never imports ray)."""
    ray = serve.add_argument_group("Ray Serve (needs t2i-ray; see docs/serving.md)")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="serve through Ray Serve: model replicas (one per GPU, else a share of the CPUs) behind one ingress",
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        metavar="A",
        help="the Ray cluster to join (default: $RAY_ADDRESS, else a local one)",
    )
    ray.add_argument(
        "--min-replicas", type=_count(0), default=1, metavar="N", help="model replicas at least (default: 1)"
    )
    ray.add_argument(
        "--max-replicas", type=_count(1), default=1, metavar="N", help="model replicas at most (default: 1)"
    )
    ray.add_argument(
        "--target-ongoing-requests",
        type=_count(1),
        default=2,
        metavar="N",
        help="requests per replica that Ray Serve scales towards (default: 2)",
    )
    ray.add_argument(
        "--models-per-replica",
        type=_count(1),
        default=3,
        metavar="N",
        help="models each replica keeps loaded, least recently used evicted first (default: 3)",
    )


def _count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"an integer in [{minimum}, {maximum}]" if maximum is not None else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected {allowed}")
        return value

    return parse


def _seconds(text: str) -> float:
    """A finite number of seconds >= 0 (``nan``, ``inf`` and negatives are refused)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected a number of seconds >= 0")
    return value


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "ray", False):
        return _run_on_ray(args)
    from ._serve import serve

    return serve(args)


def _run_on_ray(args: argparse.Namespace) -> int:
    import importlib

    from t2i_core import InvalidRequestError

    try:
        module = importlib.import_module("t2i_ray._serve")
    except ImportError as exc:
        raise InvalidRequestError("--ray", True, f"t2i-ray with ray[serve] installed ({exc})") from None
    status: int = module.serve_on_ray(args)
    return status
