"""``t2i serve --ray``: t2i serve's HTTP API as a Ray Serve application (an ingress and model replicas).

The model replicas claim one GPU each where the cluster has GPUs, else a share of the CPUs (a
fraction of one when there are more replicas than CPUs); Ray Serve scales them between
``--min-replicas`` and ``--max-replicas`` to keep about ``--target-ongoing-requests`` requests on
each. Each replica keeps its own LRU of ``--models-per-replica`` loaded models (Serve's model
multiplexing), and the ingress sends each request to a replica that has its model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
import threading
from typing import Any, cast

import attrs

from t2i_core import InvalidRequestError

#: the name of the Serve application (and the prefix of its deployments' actors)
APP_NAME = "t2i"
MODELS_DEPLOYMENT = "t2i-models"
INGRESS_DEPLOYMENT = "t2i-ingress"


@attrs.frozen(kw_only=True)
class ReplicaPlan:
    """What each model replica claims, and the torch threads it runs with."""

    num_cpus: float
    num_gpus: float
    device: str
    threads: int | None


def plan_replicas(device: str, max_replicas: int, cpus: float, gpus: float) -> ReplicaPlan:
    """One GPU per replica where the cluster has GPUs (and `device` allows them), else a share of the CPUs."""
    if gpus >= 1 and not device.startswith(("cpu", "mps")):
        return ReplicaPlan(num_cpus=1.0, num_gpus=1.0, device="cuda" if device == "auto" else device, threads=None)
    if device.startswith(("cuda", "mps")):
        raise InvalidRequestError("--device", device, "auto or cpu (the Ray cluster has no GPU)")
    share = cpus / max_replicas
    num_cpus = min(1.0, math.floor(share * 100) / 100) or 0.01
    return ReplicaPlan(num_cpus=num_cpus, num_gpus=0.0, device="cpu", threads=max(1, int(share)))


def check_flags(args: argparse.Namespace) -> None:
    """The replica bounds, as one-line errors naming the flag."""
    if args.max_replicas < max(1, args.min_replicas):
        raise InvalidRequestError(
            "--max-replicas", args.max_replicas, f"an integer >= --min-replicas ({args.min_replicas}) and >= 1"
        )
    if not args.target_ongoing_requests > 0:
        raise InvalidRequestError("--target-ongoing-requests", args.target_ongoing_requests, "a number > 0")


def replica_args(args: argparse.Namespace, device: str) -> argparse.Namespace:
    """`args` as the replicas get them: plain values only, on the replicas' device."""
    plain = {key: value for key, value in vars(args).items() if not callable(value)}
    return argparse.Namespace(**{**plain, "device": device})


def deploy(args: argparse.Namespace, specs: list[tuple[str, str]]) -> str:
    """Run the application on the Ray cluster this process is connected to; its URL."""
    import ray
    from ray import serve as ray_serve

    from ._serve_ingress import Ingress
    from ._serve_replica import replica_class

    check_flags(args)
    serve: Any = ray_serve  # ray's API is untyped
    resources = cast(Any, ray).cluster_resources()
    plan = plan_replicas(args.device, args.max_replicas, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
    port = args.port or _free_port(args.host)
    serve.start(http_options={"host": args.host, "port": port})
    limits_queue = getattr(args, "queue_size", 32)
    models = serve.deployment(replica_class(args.models_per_replica)).options(
        name=MODELS_DEPLOYMENT,
        ray_actor_options={"num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus},
        autoscaling_config={
            "min_replicas": args.min_replicas,
            "initial_replicas": max(1, args.min_replicas),
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        },
        max_ongoing_requests=max(limits_queue + 1, math.ceil(args.target_ongoing_requests) + 1),
        health_check_period_s=2,
        graceful_shutdown_timeout_s=getattr(args, "shutdown_timeout", 30.0),
    )
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        name=INGRESS_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=getattr(args, "max_connections", 256),
    )
    sources = dict(specs)
    application = ingress.bind(
        models.bind(replica_args(args, plan.device), sources, plan.threads),
        replica_args(args, plan.device),
        list(sources),
    )
    serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    return f"http://{shown}:{port}/"


def serve_on_ray(args: argparse.Namespace) -> int:
    """``t2i serve --ray``: deploy, then wait for Ctrl-C or SIGTERM and take the application down."""
    import ray
    from ray import serve
    from t2i_server.embed import model_specs, resolve_secrets

    for flag, dest in (("--max-memory", "max_memory"), ("--pin", "pin")):
        if getattr(args, dest, None):
            allowed = "nothing with --ray: each replica keeps its --models-per-replica most recently used models"
            raise InvalidRequestError(flag, getattr(args, dest), allowed)
    specs = model_specs(args)
    names = [name for name, _source in specs]
    args = resolve_secrets(args)  # the ingress and the replicas may run where this environment is not
    check_flags(args)
    joined = bool(args.ray_address or os.environ.get("RAY_ADDRESS"))
    ray.init(address=args.ray_address, log_to_driver=False)
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    try:
        url = deploy(args, specs)
        print(f"t2i serve --ray: loading {names[0]} on a replica ...", file=sys.stderr, flush=True)
        _warm_up(args, port=int(url.rstrip("/").rpartition(":")[2]), default=names[0])
        print(
            f"t2i serve --ray: serving {', '.join(names)} on {url} (Ray Serve, {args.min_replicas} to "
            f"{args.max_replicas} replicas); Ctrl-C or SIGTERM stops it",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    finally:
        if joined:  # a cluster others may use: take only this application down
            cast(Any, serve).delete(APP_NAME)
        ray.shutdown()  # a local cluster (started here) ends with this process
    print("t2i serve --ray: stopped", file=sys.stderr)
    return 0


def _warm_up(args: argparse.Namespace, *, port: int, default: str) -> None:
    """Load the default model on a replica before saying the server is ready; a model that cannot load
    is a one-line error naming it (the other models load when a request first names them)."""
    import urllib.error
    import urllib.request

    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(args.host, args.host)
    shown = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(f"http://{shown}:{port}/sdapi/v1/samplers")
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=3600):
            return
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
    raise InvalidRequestError("--model", default, f"a model the replicas can load ({message})")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
