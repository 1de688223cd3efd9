"""`load()`: a model name to an `Engine`, with the accelerators applied once and the weights cached.

Loading resolves the model (`sources`), checks the accelerators against the device and each
other, loads the pipeline through its provider (once per process for the same model, device and
accelerators, however many threads ask) and applies the accelerators in phase order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from .._hub import hub_failure, read_model_index
from .._locks import loading_lock
from .._single_file_components import DENOISERS, is_gguf, quantizes
from ..accelerator import PHASES, Accelerator, LoadContext
from ..errors import (
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    ModelNotFoundError,
    T2IError,
    UnsupportedFeatureError,
)
from ..provider import load_pipeline_of
from ..registry import Registry, get_registry
from ..registry.registry import split_spec
from .run import Engine
from .sources import Resolved, check_components, resolve_device, resolve_model

logger = logging.getLogger("t2i.accelerators")

_cache: dict[tuple[Any, ...], Any] = {}
_cache_lock = threading.Lock()
#: one lock per cache key, so that threads asking for the same model wait for one load
_key_locks: dict[tuple[Any, ...], threading.Lock] = {}


def _cached_pipeline(
    key: tuple[Any, ...],
    model: str,
    resolved: Resolved,
    chosen: tuple[Accelerator, ...],
    context: LoadContext,
    allow_pickle: bool,
) -> Any:
    """The cached pipeline for `key`, loading it once however many threads ask at the same time."""
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _cache_lock:
            cached = _cache.get(key)
        if cached is not None:
            return cached
        with loading_lock:
            pipeline = _load_pipeline(model, resolved, chosen, context, allow_pickle)
        with _cache_lock:
            # A file replaced on disk is a new version: drop the weights of the old one.
            for stale in [k for k in _cache if k[:-1] == key[:-1] and k[-1] != key[-1]]:
                del _cache[stale]
            _cache[key] = pipeline
        return pipeline


def _file_version(source: str) -> tuple[int, int, int] | None:
    """What tells a single file's versions apart (size, modification time, inode); None for the rest.

    Part of the cache key, so that a checkpoint overwritten on disk is loaded again, not served stale.
    """
    try:
        stat = os.stat(source)
    except OSError:
        return None
    import stat as stat_module

    if not stat_module.S_ISREG(stat.st_mode):
        return None
    return (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def clear_cache(*engines: Engine) -> None:
    """Drop the weights the engine cache holds: all of them, or those `engines` were made from.

    Engines already made keep theirs: the memory is freed once no engine holds them any more
    (a server evicting a model drops its engines, then their cached weights).
    """
    with _cache_lock:
        if not engines:
            _cache.clear()
            return
        held = {id(module) for engine in engines for module in _modules_of(engine.pipeline)}
        for key in [key for key, pipeline in _cache.items() if held & {id(m) for m in _modules_of(pipeline)}]:
            del _cache[key]


def _modules_of(pipeline: Any) -> list[Any]:
    """The components of `pipeline` that hold weights (its torch modules)."""
    components = getattr(pipeline, "components", None) or {}
    return [value for value in components.values() if hasattr(value, "parameters")]


def load(
    model: str | os.PathLike[str],
    *,
    family: str | None = None,
    device: str = "auto",
    accelerators: Iterable[str] | None = None,
    cache: bool = True,
    allow_pickle: bool = False,
    config: str | None = None,
) -> Engine:
    """Load `model` into an `Engine`.

    :param model: a hub id, a local diffusers folder, a family alias (``"sd15"``), ``tiny:<family>``
        or a single-file checkpoint (``model.safetensors``, a GGUF ``model.gguf`` for the families that
        load one; ``.ckpt`` only with `allow_pickle`).
    :param family: the provider to use; None detects it from ``model_index.json``.
    :param device: ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    :param accelerators: accelerator or preset names, applied in phase order; None = the ``auto`` preset.
        An accelerator that takes a value is written ``NAME@VALUE`` (``first-block-cache@0.15``).
    :param cache: reuse weights already loaded in this process for the same model, family,
        device and accelerators (each engine still gets its own pipeline object and scheduler).
    :param allow_pickle: also load ``.bin`` (pickle) weights when a checkpoint has no safetensors.
    :param config: for a single file only: the diffusers folder, hub id or ``tiny:<family>`` whose
        configs and tokenizers it loads with; None = the family's default repository, from the
        local Hugging Face cache only (see ``docs/single-file.md``).
    """
    registry = get_registry()
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("model", model, "a hub id, a local folder, a family alias or tiny:<family>")
    if family is not None and not isinstance(family, str):
        raise InvalidRequestError("family", family, "None or a family name: " + ", ".join(sorted(registry.providers)))
    resolved = resolve_model(registry, model, family, config=config, allow_pickle=allow_pickle)
    device = resolve_device(device)
    names = _accelerator_names(accelerators, registry)
    chosen = registry.resolve_accelerators(names, device, _denoiser_kind(model, names, resolved, registry))
    context = LoadContext(
        model=model,
        source=resolved.source,
        family=resolved.family,
        provider=resolved.provider,
        device=device,
        accelerators=tuple(a.name for a in chosen),
        config=resolved.config,
    )
    optional = {n for name in names if name in registry.presets for n in registry.presets[name].optional}
    optional -= {split_spec(name)[0] for name in names}  # asked for by name: refused, not left out
    if optional:
        chosen = _without_unfit(chosen, context, optional)
        context = attrs.evolve(context, accelerators=tuple(a.name for a in chosen))
    _check_accelerators(chosen, context)
    specs = tuple(a.spec for a in chosen)
    key = (
        resolved.family,
        resolved.source,
        device,
        specs,
        allow_pickle,
        resolved.config,
        _file_version(resolved.source),
    )
    if cache:
        pipeline = resolved.provider.share(_cached_pipeline(key, model, resolved, chosen, context, allow_pickle))
    else:
        with loading_lock:
            pipeline = _load_pipeline(model, resolved, chosen, context, allow_pickle)
    pipeline.set_progress_bar_config(disable=True)
    return Engine(
        model=model,
        source=resolved.source,
        family=resolved.family,
        provider=resolved.provider,
        pipeline=pipeline,
        device=device,
        accelerators=chosen,
        registry=registry,
    )


def _accelerator_names(accelerators: Iterable[str] | None, registry: Registry) -> list[str]:
    if accelerators is None:
        return ["auto"] if "auto" in registry.presets else []
    if isinstance(accelerators, str):
        accelerators = [accelerators]
    if not isinstance(accelerators, Iterable):
        raise InvalidRequestError("accelerators", accelerators, "None or a list of accelerator or preset names")
    names = list(accelerators)
    for name in names:
        if not isinstance(name, str):
            raise InvalidRequestError("accelerators", name, "accelerator names (str), NAME or NAME@VALUE")
    return names


def _denoiser_kind(model: str, names: list[str], resolved: Resolved, registry: Registry) -> str | None:
    """The kind of denoiser the checkpoint has (``"transformer"``, ``"unet"``, ``"prior"``), for presets
    whose stacks depend on it; None when no such preset is asked for or ``model_index.json`` says nothing."""
    if not any(registry.presets[name].denoisers for name in names if name in registry.presets):
        return None
    model_index = resolved.model_index
    if model_index is None or resolved.config is not None:
        folder = resolved.config if resolved.config is not None else resolved.source
        local = resolved.config is not None or resolved.is_local
        try:
            model_index = read_model_index(model, folder, local)
        except T2IError:  # out of reach: the preset's plain stacks
            return None
    return next((kind for kind in DENOISERS if kind in model_index), None)


def _without_unfit(
    chosen: tuple[Accelerator, ...], context: LoadContext, optional: set[str]
) -> tuple[Accelerator, ...]:
    """A preset's optional accelerators that this device, checkpoint or stack cannot take, left out
    (a step cache on a denoiser without cache hooks), each said on the ``t2i.accelerators`` logger."""
    kept = list(chosen)
    for accelerator in chosen:
        if accelerator.name not in optional:
            continue
        others = {a.name for a in kept if a is not accelerator}
        try:
            # a clash either side declares: the other one is no optional to leave out instead
            declared_by_others = sorted(a.name for a in kept if accelerator.name in a.conflicts)
            if declared_by_others:
                raise IncompatibleAcceleratorsError(
                    [accelerator.name, *declared_by_others], f"{', '.join(declared_by_others)} exclude it"
                )
            _check_accelerator(accelerator, others, context)
        except (IncompatibleAcceleratorsError, UnsupportedFeatureError) as exc:
            kept.remove(accelerator)
            logger.info("the preset's %s is left out: %s", accelerator.name, exc)
    return tuple(kept)


def _check_accelerators(chosen: tuple[Accelerator, ...], context: LoadContext) -> None:
    names = {a.name for a in chosen}
    for accelerator in chosen:
        _check_accelerator(accelerator, names, context)


def _check_accelerator(accelerator: Accelerator, names: set[str], context: LoadContext) -> None:
    """Refuse `accelerator` on this device, beside the accelerators `names`, or by its own `check`."""
    if context.device.split(":", 1)[0] not in accelerator.devices:
        raise IncompatibleAcceleratorsError(
            [accelerator.name], f"it runs on {', '.join(accelerator.devices)}, not on {context.device}"
        )
    clash = sorted(names.intersection(accelerator.conflicts))
    if clash:
        raise IncompatibleAcceleratorsError(
            [accelerator.name, *clash], f"{accelerator.name} excludes {', '.join(clash)}"
        )
    accelerator.check(context)


def _load_pipeline(
    model: str,
    resolved: Resolved,
    chosen: tuple[Accelerator, ...],
    context: LoadContext,
    allow_pickle: bool,
) -> Any:
    if resolved.config is not None:
        pipeline = _load_single_file(model, resolved, chosen, context)
        return _apply_accelerators(pipeline, chosen, context)
    if resolved.is_local:
        check_components(model, Path(resolved.source), resolved.provider.skipped_components)
    model_index = resolved.model_index
    if model_index is None:
        with contextlib.suppress(ModelNotFoundError):  # another layout, or the hub is out of reach: load says
            model_index = read_model_index(model, resolved.source, resolved.is_local)
    load_kwargs: dict[str, Any] = {"use_safetensors": None if allow_pickle else True}
    for accelerator in chosen:
        load_kwargs.update(accelerator.load_kwargs(context))
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 renamed torch_dtype to dtype; older releases t2i supports know only the first.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipeline = load_pipeline_of(resolved.provider, resolved.source, load_kwargs, model_index)
    except Exception as exc:
        raise _load_error(model, resolved, exc, allow_pickle) from exc
    resolved.provider.check_pipeline(model, pipeline)
    return _apply_accelerators(pipeline, chosen, context)


def _load_single_file(model: str, resolved: Resolved, chosen: tuple[Accelerator, ...], context: LoadContext) -> Any:
    assert resolved.config is not None
    load_kwargs: dict[str, Any] = {}
    for accelerator in chosen:
        kwargs = accelerator.load_kwargs(context)
        if is_gguf(resolved.source) and _quantizes_denoiser(accelerator, kwargs):
            raise IncompatibleAcceleratorsError(
                [accelerator.name],
                f"{model} is a GGUF file, whose {resolved.family} denoiser is quantized already: drop "
                f"{accelerator.name}, or load the model's .safetensors file or diffusers folder to quantize it",
            )
        load_kwargs.update(kwargs)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipeline = resolved.provider.load_single_file(resolved.source, resolved.config, load_kwargs)
    except T2IError:
        raise
    except Exception as exc:
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        raise ModelNotFoundError(
            model,
            f"diffusers could not load it as a single-file {resolved.family} checkpoint with the configs of "
            f"{resolved.config} ({reason})",
        ) from exc
    resolved.provider.check_pipeline(model, pipeline)
    return pipeline


def _quantizes_denoiser(accelerator: Accelerator, load_kwargs: dict[str, Any]) -> bool:
    """Whether `accelerator` quantizes the denoiser: its quantization config says so, or it quantizes after load."""
    if accelerator.phase != "quantize":
        return False
    quantization = load_kwargs.get("quantization_config")
    return quantization is None or quantizes(quantization, DENOISERS)


def _apply_accelerators(pipeline: Any, chosen: tuple[Accelerator, ...], context: LoadContext) -> Any:
    placed = False
    for accelerator in chosen:
        if accelerator.phase == "placement":
            placed = True
        elif not placed and _after_placement(accelerator):
            pipeline.to(context.device)
            placed = True
        accelerator.apply(pipeline, context)
    if not placed:
        pipeline.to(context.device)
    return pipeline


def _after_placement(accelerator: Accelerator) -> bool:
    return PHASES.index(accelerator.phase) > PHASES.index("placement")


def _load_error(model: str, resolved: Resolved, exc: Exception, allow_pickle: bool) -> Exception:
    if isinstance(exc, T2IError):
        return exc
    text = str(exc)
    missing_safetensors = ".safetensors" in text and (
        "no file named" in text.lower() or "could not find" in text.lower()
    )
    has_pickles = not resolved.is_local or any(Path(resolved.source).glob("**/*.bin"))
    if missing_safetensors and not has_pickles:
        return ModelNotFoundError(model, f"some weights are missing ({text.splitlines()[0]})")
    if not allow_pickle and (missing_safetensors or "Could not find the necessary `safetensors`" in text):
        return ModelNotFoundError(
            model, "it has no safetensors weights; pass allow_pickle=True (--allow-pickle) to load .bin files"
        )
    if not resolved.is_local and isinstance(exc, (OSError, ValueError)):
        return ModelNotFoundError(model, hub_failure(exc))
    return ModelNotFoundError(
        model,
        f"diffusers could not load it as a {resolved.family} pipeline ({type(exc).__name__}: {text.splitlines()[0] if text else ''})",
    )
