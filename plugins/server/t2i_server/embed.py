"""``t2i serve`` as parts, for a process manager that runs it its own way (t2i-ray's ``t2i serve --ray``).

The application (`create_app`) over a `Service` of models, the two outer ASGI layers it puts in
front (`BearerToken`, `BodyLimit`), and what the ``serve`` command's flags mean: the models they
name (`model_specs`), the limits (`limits_from`), a one-model service as ``t2i serve`` makes it
(`one_model_service`). Importing this module imports FastAPI and uvicorn: import it when serving.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import attrs

from t2i_core import InvalidRequestError

from . import TOKEN_ENV
from ._app import AUTHORIZED, BearerToken, BodyLimit, create_app, event_stream
from ._jobs import FINISHED, ServedModel, Service, load_model, relay
from ._limits import Limits

__all__ = [
    "AUTHORIZED",
    "FINISHED",
    "BearerToken",
    "BodyLimit",
    "Limits",
    "ServedModel",
    "Service",
    "create_app",
    "event_stream",
    "limits_from",
    "load_model",
    "model_specs",
    "one_model_service",
    "relay",
    "resolve_secrets",
]


def model_specs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(public name, model to load) of every ``--model`` and every model of each ``--models-dir``, each once."""
    from ._serve import _model_spec

    specs = [_model_spec(text) for text in args.model or ()]
    for folder in getattr(args, "models_dir", None) or ():
        models = importlib.import_module("t2i_server._models")  # where --models-dir is declared
        specs += list(models.scan_folder(folder, allow_pickle=args.allow_pickle).items())
    if not specs:
        raise InvalidRequestError("--model", None, "a model to serve: --model MODEL, or --models-dir DIR")
    names = [name for name, _source in specs]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate is not None:
        raise InvalidRequestError("--model", duplicate, "each model once (NAME= serves one under another name)")
    return specs


def resolve_secrets(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with ``--token`` and ``--webhook-secret`` taken from the environment where not given, and the
    folders checked: other processes (other machines) get them from `args`, not from their environment."""
    from ._serve import _folders, _webhook_secret

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and not token.strip():
        raise InvalidRequestError("--token", token, "a non-empty token")
    _folders(args)
    return argparse.Namespace(**{**vars(args), "token": token, "webhook_secret": _webhook_secret(args)})


def limits_from(args: argparse.Namespace) -> Limits:
    """The `Limits` that ``t2i serve``'s flags set (each `Limits` field has a flag of its name)."""
    given = {field.name: getattr(args, field.name) for field in attrs.fields(Limits) if hasattr(args, field.name)}
    return Limits(**given)


def one_model_service(args: argparse.Namespace, name: str, source: str) -> Service:
    """The `Service` ``t2i serve`` makes for ``--model NAME=SOURCE`` alone, with `args`' other flags
    (device, accelerators, ControlNets, IP-Adapters, LoRA and embedding folders, limits, webhooks)."""
    from ._serve import _folders, _load_controlnets, _load_ip_adapters, _use_folders

    shown = source if name == source else f"{source} as {name}"
    print(f"t2i serve: loading {shown} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    served = load_model(name, source, device=args.device, accelerators=args.accelerator, allow_pickle=args.allow_pickle)
    _use_folders([served], *_folders(args))
    service = Service(
        [served],
        limits_from(args),
        controlnets=args.controlnet,
        ip_adapters=args.ip_adapter,
        allowed_options=args.allow_option,
        webhook_secret=args.webhook_secret,
    )
    _load_controlnets(service, args.controlnet)
    _load_ip_adapters(service, args.ip_adapter)
    engine = served.engine
    print(
        f"t2i serve: loaded {name}: {engine.family} on {engine.device} in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return service
