"""Where a model comes from: the device, and the model name resolved to a source and a family.

Reads names, folders and ``model_index.json`` only, never weights: the engine's loading and the
batch dry run both start here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from .._hub import is_hub_id, read_model_index
from .._locks import loading_lock
from ..errors import InvalidRequestError, ModelNotFoundError, UndetectedFamilyError
from ..provider import ModelProvider
from ..registry import Registry
from ..tiny import TINY_PREFIX, ensure_built
from . import single_file

DEVICE_TYPES = ("cpu", "cuda", "mps")


@attrs.frozen
class Resolved:
    """Where a model's files are and which family loads them (`resolve_model`)."""

    source: str
    family: str
    provider: ModelProvider
    is_local: bool
    #: ``model_index.json`` when detecting the family read it already
    model_index: dict[str, Any] | None = None
    #: for a single-file checkpoint (`source` is the file): the local folder of its configs
    config: str | None = None


def resolve_device(device: str) -> str:
    """``"auto"`` → cuda, else mps, else cpu; anything else is checked and returned."""
    if not isinstance(device, str):
        raise InvalidRequestError("device", device, '"auto", "cpu", "cuda", "cuda:N" or "mps"')
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":", 1)[0]
    if kind not in DEVICE_TYPES or (":" in device and not device.split(":", 1)[1].isdigit()):
        raise InvalidRequestError("device", device, '"auto", "cpu", "cuda", "cuda:N" or "mps"')
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device", device, "a device present on this machine (no CUDA device found)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidRequestError("device", device, "a device present on this machine (MPS is not available)")
    return device


def resolve_model(
    registry: Registry, model: str, family: str | None, *, config: str | None = None, allow_pickle: bool = False
) -> Resolved:
    if family is not None:
        registry.provider(family)  # UnknownFamilyError names the known families
    if single_file.is_single_file(Path(model)) and not model.startswith(TINY_PREFIX):
        return _resolve_single_file(registry, model, family, config, allow_pickle)
    if config is not None:
        raise InvalidRequestError(
            "config", config, "None unless model is a single-file checkpoint (.safetensors, .gguf)"
        )
    if model.startswith(TINY_PREFIX):
        tiny_family = model[len(TINY_PREFIX) :]
        provider = registry.provider(tiny_family)
        if family is not None and family != tiny_family:
            raise InvalidRequestError("family", family, f"{tiny_family!r} (the family of {model}) or None")
        with loading_lock:
            folder = ensure_built(provider.name, provider.tiny_version, provider.build_tiny)
        return Resolved(source=str(folder), family=provider.name, provider=provider, is_local=True)
    for provider in registry.providers.values():
        if model in provider.aliases and (family is None or family == provider.name):
            return Resolved(source=provider.aliases[model], family=provider.name, provider=provider, is_local=False)
    path = Path(model).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a name too long for the file system (and far too long for a hub id)
        raise ModelNotFoundError(model, f"it is neither a local folder nor a hub id ({exc.strerror or exc})") from None
    if exists:
        if not path.is_dir():
            raise ModelNotFoundError(
                model,
                "it is a file; expected a diffusers pipeline folder or a single-file checkpoint (.safetensors, .gguf)",
            )
        source, is_local = str(path), True
    elif not is_hub_id(model):
        raise ModelNotFoundError(model, f"the local folder {path} does not exist (and it is not a hub id)")
    else:
        source, is_local = model, False
    if family is not None:
        return Resolved(source=source, family=family, provider=registry.provider(family), is_local=is_local)
    index = read_model_index(model, source, is_local)
    for provider in registry.providers.values():
        if provider.detect(index):
            return Resolved(
                source=source, family=provider.name, provider=provider, is_local=is_local, model_index=index
            )
    broken = [info.name for info in registry.failures()]
    raise UndetectedFamilyError(model, index.get("_class_name"), registry.providers, broken_plugins=broken)


def _resolve_single_file(
    registry: Registry, model: str, family: str | None, config: str | None, allow_pickle: bool
) -> Resolved:
    path = Path(model).expanduser()
    try:
        is_file = path.is_file()
    except OSError as exc:
        raise ModelNotFoundError(model, f"it is not a usable path ({exc.strerror or exc})") from None
    if not is_file:
        raise ModelNotFoundError(model, f"the single-file checkpoint {path} does not exist")
    names = single_file.tensor_names(model, path, allow_pickle)
    provider = single_file.detect(registry, model, names, family)
    with loading_lock:  # a tiny:<family> config may be built
        folder = single_file.config_folder(model, provider, config)
    return Resolved(source=str(path), family=provider.name, provider=provider, is_local=True, config=folder)


def check_components(model: str, folder: Path, skipped: tuple[str, ...] = ()) -> None:
    """Name the component folder a local checkpoint lacks (``vae/``) before diffusers trips on it."""
    if not (folder / "model_index.json").is_file():
        return  # a provider that loads another layout; it names what is missing itself
    index = read_model_index(model, str(folder), True)
    for name, spec in index.items():
        if name.startswith("_") or name in skipped or not isinstance(spec, list) or len(spec) != 2 or None in spec:
            continue
        if not (folder / name).is_dir():
            raise ModelNotFoundError(
                model, f"its component folder {name}/ is missing from {folder} (model_index.json lists {spec[1]})"
            )
