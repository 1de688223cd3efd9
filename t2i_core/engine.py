"""`load()` a model into an `Engine`, then `Engine.generate()` images from requests.

Loading resolves the model (tiny name, alias, local folder or hub id) and its family,
applies the accelerators in phase order, and caches the loaded weights for the process.
Generating fills in the family's defaults, lets the conditioners build the call, and has
the provider run it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from . import schedulers
from ._manager import Registry, get_registry
from .accelerator import PHASES, Accelerator, LoadContext
from .conditioner import Call
from .errors import (
    GenerationError,
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    ModelNotFoundError,
    T2IError,
    UndetectedFamilyError,
    UnsupportedFeatureError,
)
from .provider import ModelProvider, ProgressCallback
from .request import GenerationRequest, GenerationResult
from .tiny import TINY_PREFIX, ensure_built

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_NAMESPACED_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(value: str, *, namespaced: bool = False) -> bool:
    """Whether `value` is shaped like a Hugging Face Hub id (``name`` or ``owner/name``).

    Paths never are: they start with ``.``, ``/`` or ``~``, or hold a backslash or two slashes.
    `namespaced` requires the ``owner/`` part.
    """
    return bool((_NAMESPACED_HUB_ID if namespaced else _HUB_ID).match(value))


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


DEVICE_TYPES = ("cpu", "cuda", "mps")


@attrs.frozen
class _Resolved:
    source: str
    family: str
    provider: ModelProvider
    is_local: bool


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


def read_model_index(model: str, source: str, is_local: bool) -> dict[str, Any]:
    """Read only ``model_index.json`` (never weights) from a local folder or the hub."""
    if is_local:
        path = Path(source) / "model_index.json"
        if not path.is_file():
            raise ModelNotFoundError(model, f"{path} does not exist: not a diffusers pipeline folder")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, "model_index.json"))
        except Exception as exc:  # noqa: BLE001 - every hub failure means the same to the user
            raise ModelNotFoundError(model, _hub_failure(exc)) from None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers JSON and Unicode decoding errors
        raise ModelNotFoundError(model, f"{path} is not a readable model_index.json ({type(exc).__name__})") from None
    if not isinstance(index, dict):
        raise ModelNotFoundError(model, f"{path} is not a model_index.json (expected a JSON object)")
    return index


def _hub_failure(exc: BaseException) -> str:
    if hub_offline():
        return "it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
    name = type(exc).__name__
    if "RepositoryNotFound" in name:
        return "no such repository on the Hugging Face Hub (or it is private)"
    return f"it could not be fetched from the Hugging Face Hub ({name}); check the id and the network"


class Engine:
    """A loaded model, with its accelerators applied, ready to generate images.

    An engine is not thread-safe: use one per thread (a cached `load()` shares the weights).
    """

    def __init__(
        self,
        *,
        model: str,
        source: str,
        family: str,
        provider: ModelProvider,
        pipeline: Any,
        device: str,
        accelerators: tuple[Accelerator, ...],
        registry: Registry,
    ) -> None:
        self.model = model
        self.source = source
        self.family = family
        self.provider = provider
        self.pipeline = pipeline
        self.device = device
        self.accelerators = tuple(a.name for a in accelerators)
        #: per-engine state of conditioners and accelerators (a Compel instance, ControlNets, ...)
        self.state: dict[str, Any] = {}
        self._registry = registry
        owner = provider.scheduler_owner(pipeline)
        self._default_scheduler = owner.scheduler
        self._schedulers: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"Engine(model={self.model!r}, family={self.family!r}, device={self.device!r}, accelerators={self.accelerators!r})"

    def resolve(self, request: GenerationRequest) -> tuple[GenerationRequest, dict[str, Any]]:
        """Check `request` against this engine and fill in defaults and the seed; no image work."""
        if not isinstance(request, GenerationRequest):
            raise InvalidRequestError("request", request, "a t2i_core.GenerationRequest")
        schedulers.check(request.scheduler, self.provider.schedulers, self.family)
        options = self.provider.check(request)
        trained = getattr(self._default_scheduler.config, "num_train_timesteps", None)
        if request.num_inference_steps is not None and trained and request.num_inference_steps > trained:
            allowed = f"an integer in [1, {trained}] (the scheduler's training steps)"
            raise InvalidRequestError("num_inference_steps", request.num_inference_steps, allowed)
        self._check_conditioners(request)
        defaults = self.provider.defaults
        native_height, native_width = self.provider.native_size(self.pipeline)
        resolved = request.evolve(
            height=request.height or defaults.height or native_height,
            width=request.width or defaults.width or native_width,
            num_inference_steps=request.num_inference_steps or defaults.num_inference_steps,
            guidance_scale=defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            seed=secrets.randbelow(2**32) if request.seed is None else request.seed,
            scheduler=request.scheduler or schedulers.DEFAULT,
        )
        return resolved, options

    def _check_conditioners(self, request: GenerationRequest) -> None:
        conditioners = self._registry.ordered_conditioners()
        if request.prompt_weighting is not None:
            syntaxes = sorted({c.weighting for c in conditioners if c.weighting})
            if request.prompt_weighting not in syntaxes:
                allowed = (
                    "None or one of " + ", ".join(repr(s) for s in syntaxes)
                    if syntaxes
                    else "None (install t2i-compel for 'compel')"
                )
                raise InvalidRequestError("prompt_weighting", request.prompt_weighting, allowed)
        if request.controls and not any(c.wants(request) for c in conditioners):
            raise InvalidRequestError(
                "controls", request.controls, "() unless a ControlNet conditioner (t2i-controlnet) is installed"
            )
        for conditioner in conditioners:
            if conditioner.wants(request):
                if conditioner.families is not None and self.family not in conditioner.families:
                    raise UnsupportedFeatureError(
                        self.family, conditioner.feature or conditioner.name, conditioner.families
                    )
                conditioner.prepare(self, request)

    def generate(self, request: GenerationRequest, *, progress: ProgressCallback | None = None) -> GenerationResult:
        """Make `request.num_images` images. `progress(step, total)` is called after each denoising step."""
        import torch

        resolved, options = self.resolve(request)
        assert resolved.seed is not None
        seeds = [resolved.seed + i for i in range(resolved.num_images)]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs = self.provider.call_kwargs(resolved, options)
        kwargs["generator"] = generators[0] if len(generators) == 1 else generators
        self._use_scheduler(resolved.scheduler or schedulers.DEFAULT)
        call = Call(pipeline=self.pipeline, kwargs=kwargs)
        for conditioner in self._registry.ordered_conditioners():
            if conditioner.wants(resolved):
                conditioner.condition(self, resolved, call)
        try:
            images = self.provider.run(call.pipeline, call.kwargs, progress)
        except RuntimeError as exc:  # torch's out-of-memory errors are RuntimeErrors
            text = str(exc)
            out_of_memory = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text
            if not out_of_memory and "allocate" not in text:
                raise
            raise GenerationError(
                f"out of memory on {self.device} making {resolved.num_images} image(s) of "
                f"{resolved.width}x{resolved.height}: lower the size or num_images, or load with "
                f"the low-memory preset ({text.splitlines()[0] if text else type(exc).__name__})"
            ) from None
        return GenerationResult(images=images, seeds=seeds, request=resolved, model=self.model, family=self.family)

    def _use_scheduler(self, name: str) -> None:
        owner = self.provider.scheduler_owner(self.pipeline)
        if name == schedulers.DEFAULT:
            owner.scheduler = self._default_scheduler
            return
        if name not in self._schedulers:
            self._schedulers[name] = schedulers.build(name, self._default_scheduler.config)
        owner.scheduler = self._schedulers[name]


# -- loading ---------------------------------------------------------------------------------

_cache: dict[tuple[Any, ...], Any] = {}
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Drop every pipeline the engine cache holds (engines already made keep theirs)."""
    with _cache_lock:
        _cache.clear()


def load(
    model: str | os.PathLike[str],
    *,
    family: str | None = None,
    device: str = "auto",
    accelerators: Iterable[str] | None = None,
    cache: bool = True,
    allow_pickle: bool = False,
) -> Engine:
    """Load `model` into an `Engine`.

    :param model: a hub id, a local diffusers folder, a family alias (``"sd15"``) or ``tiny:<family>``.
    :param family: the provider to use; None detects it from ``model_index.json``.
    :param device: ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    :param accelerators: accelerator or preset names, applied in phase order; None = the ``auto`` preset.
    :param cache: reuse weights already loaded in this process for the same model, family,
        device and accelerators (each engine still gets its own pipeline object and scheduler).
    :param allow_pickle: also load ``.bin`` (pickle) weights when a checkpoint has no safetensors.
    """
    registry = get_registry()
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("model", model, "a hub id, a local folder, a family alias or tiny:<family>")
    if family is not None and not isinstance(family, str):
        raise InvalidRequestError("family", family, "None or a family name: " + ", ".join(sorted(registry.providers)))
    resolved = _resolve_model(registry, model, family)
    device = resolve_device(device)
    names = _accelerator_names(accelerators, registry)
    chosen = registry.resolve_accelerators(names, device)
    context = LoadContext(
        model=model,
        source=resolved.source,
        family=resolved.family,
        provider=resolved.provider,
        device=device,
        accelerators=tuple(a.name for a in chosen),
    )
    _check_accelerators(chosen, context)
    key = (resolved.family, resolved.source, device, context.accelerators, allow_pickle)
    with _cache_lock:
        cached = _cache.get(key) if cache else None
    if cached is not None:
        pipeline = resolved.provider.share(cached)
    else:
        pipeline = _load_pipeline(model, resolved, chosen, context, allow_pickle)
        if cache:
            with _cache_lock:
                _cache[key] = pipeline
            pipeline = resolved.provider.share(pipeline)
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
            raise InvalidRequestError("accelerators", name, "accelerator names (str)")
    return names


def _check_accelerators(chosen: tuple[Accelerator, ...], context: LoadContext) -> None:
    names = {a.name for a in chosen}
    kind = context.device.split(":", 1)[0]
    for accelerator in chosen:
        if kind not in accelerator.devices:
            raise IncompatibleAcceleratorsError(
                [accelerator.name], f"it runs on {', '.join(accelerator.devices)}, not on {context.device}"
            )
        clash = sorted(names.intersection(accelerator.conflicts))
        if clash:
            raise IncompatibleAcceleratorsError(
                [accelerator.name, *clash], f"{accelerator.name} excludes {', '.join(clash)}"
            )
        accelerator.check(context)


def _resolve_model(registry: Registry, model: str, family: str | None) -> _Resolved:
    if family is not None:
        registry.provider(family)  # UnknownFamilyError names the known families
    if model.startswith(TINY_PREFIX):
        tiny_family = model[len(TINY_PREFIX) :]
        provider = registry.provider(tiny_family)
        if family is not None and family != tiny_family:
            raise InvalidRequestError("family", family, f"{tiny_family!r} (the family of {model}) or None")
        folder = ensure_built(provider.name, provider.tiny_version, provider.build_tiny)
        return _Resolved(source=str(folder), family=provider.name, provider=provider, is_local=True)
    for provider in registry.providers.values():
        if model in provider.aliases and (family is None or family == provider.name):
            return _Resolved(source=provider.aliases[model], family=provider.name, provider=provider, is_local=False)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(model, "it is a file; expected a diffusers pipeline folder")
        source, is_local = str(path), True
    elif not is_hub_id(model):
        raise ModelNotFoundError(model, f"the local folder {path} does not exist (and it is not a hub id)")
    else:
        source, is_local = model, False
    if family is not None:
        return _Resolved(source=source, family=family, provider=registry.provider(family), is_local=is_local)
    index = read_model_index(model, source, is_local)
    for provider in registry.providers.values():
        if provider.detect(index):
            return _Resolved(source=source, family=provider.name, provider=provider, is_local=is_local)
    raise UndetectedFamilyError(model, index.get("_class_name"), registry.providers)


def _load_pipeline(
    model: str,
    resolved: _Resolved,
    chosen: tuple[Accelerator, ...],
    context: LoadContext,
    allow_pickle: bool,
) -> Any:
    load_kwargs: dict[str, Any] = {"use_safetensors": None if allow_pickle else True}
    for accelerator in chosen:
        load_kwargs.update(accelerator.load_kwargs(context))
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 renamed torch_dtype to dtype; older releases t2i supports know only the first.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipeline = resolved.provider.load(resolved.source, load_kwargs)
    except Exception as exc:
        raise _load_error(model, resolved, exc, allow_pickle) from exc
    resolved.provider.check_pipeline(model, pipeline)
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


def _load_error(model: str, resolved: _Resolved, exc: Exception, allow_pickle: bool) -> Exception:
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
        return ModelNotFoundError(model, _hub_failure(exc))
    return ModelNotFoundError(
        model,
        f"diffusers could not load it as a {resolved.family} pipeline ({type(exc).__name__}: {text.splitlines()[0] if text else ''})",
    )
