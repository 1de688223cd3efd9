"""`load()` a model into an `Engine`, then `Engine.generate()` images from requests.

Loading resolves the model (tiny name, alias, local folder or hub id) and its family,
applies the accelerators in phase order, and caches the loaded weights for the process.
Generating fills in the family's defaults, lets the conditioners build the call, and has
the provider run it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs

from . import _single_file, schedulers
from ._locks import loading_lock
from ._manager import Registry, get_registry
from .accelerator import PHASES, Accelerator, LoadContext
from .conditioner import Call
from .errors import (
    GenerationCancelled,
    GenerationError,
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    ModelNotFoundError,
    T2IError,
    UndetectedFamilyError,
    UnsupportedFeatureError,
)
from .provider import ModelProvider, ProgressCallback, load_pipeline_of
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
    if "GatedRepo" in name:
        return (
            "it is gated on the Hugging Face Hub: accept its licence on its page, then log in "
            "(hf auth login) or set HF_TOKEN"
        )
    if "RepositoryNotFound" in name:
        return "no such repository on the Hugging Face Hub (or it is private: log in or set HF_TOKEN)"
    return f"it could not be fetched from the Hugging Face Hub ({name}); check the id and the network"


#: Largest image `generate()` accepts by default, in pixels (height x width): 2048x2048.
#: ``T2I_MAX_PIXELS`` or `Engine.max_pixels` changes it.
DEFAULT_MAX_PIXELS = 2048 * 2048
MAX_PIXELS_ENV = "T2I_MAX_PIXELS"
#: Largest guidance scale a request may ask for; beyond it every model's output saturates.
MAX_GUIDANCE_SCALE = 100.0
#: Step counts every scheduler runs; beyond it the limit is found by trying the scheduler.
SURE_STEPS = 100


def _default_max_pixels() -> int:
    text = os.environ.get(MAX_PIXELS_ENV)
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 64:
        raise InvalidRequestError(f"${MAX_PIXELS_ENV}", text, "an integer number of pixels >= 64")
    return value


class Engine:
    """A loaded model, with its accelerators applied, ready to generate images.

    An engine is safe to share between threads: calls to `generate` on one engine run one at
    a time, in the order they take its lock, and each gives exactly the images it would give
    alone. Engines from the same cached `load()` share the weights and run in parallel.
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
        self._step_limits: dict[str, int] = {}
        #: largest height x width a request may ask for (default `DEFAULT_MAX_PIXELS` or ``$T2I_MAX_PIXELS``)
        self.max_pixels = _default_max_pixels()
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Engine(model={self.model!r}, family={self.family!r}, device={self.device!r}, accelerators={self.accelerators!r})"

    def resolve(self, request: GenerationRequest) -> tuple[GenerationRequest, dict[str, Any]]:
        """Check `request` against this engine and fill in defaults and the seed; no image work."""
        if not isinstance(request, GenerationRequest):
            raise InvalidRequestError("request", request, "a t2i_core.GenerationRequest")
        with self._lock:
            return self._resolve(request)

    def _resolve(self, request: GenerationRequest) -> tuple[GenerationRequest, dict[str, Any]]:
        schedulers.check(request.scheduler, self.provider.schedulers, self.family, self.provider.named_schedulers)
        options = self.provider.check(request)
        if request.guidance_scale is not None and request.guidance_scale > MAX_GUIDANCE_SCALE:
            raise InvalidRequestError(
                "guidance_scale", request.guidance_scale, f"a number in [0, {MAX_GUIDANCE_SCALE:g}]"
            )
        scheduler_name = request.scheduler or schedulers.DEFAULT
        # Every scheduler runs short schedules; only long ones are tried against the scheduler.
        if request.num_inference_steps is not None and request.num_inference_steps > SURE_STEPS:
            limit = self._step_limit(scheduler_name)
            if request.num_inference_steps > limit:
                allowed = f"an integer in [1, {limit}] (the most steps the {scheduler_name} scheduler can take)"
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
            scheduler=scheduler_name,
        )
        assert resolved.height is not None and resolved.width is not None
        if resolved.height * resolved.width > self.max_pixels:
            raise InvalidRequestError(
                "height x width",
                f"{resolved.height}x{resolved.width}",
                f"at most {self.max_pixels} pixels per image (Engine.max_pixels / ${MAX_PIXELS_ENV})",
            )
        self.provider.check_request(self.pipeline, resolved)
        return resolved, options

    def _step_limit(self, name: str) -> int:
        """The most inference steps scheduler `name` can run (its timesteps must index its training schedule)."""
        if name not in self._step_limits:
            self._step_limits[name] = schedulers.max_steps(self._scheduler(name))
        return self._step_limits[name]

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
        for field in ("loras", "embeddings"):
            value = getattr(request, field)
            if not value:
                continue
            probe = GenerationRequest(prompt=request.prompt, **{field: value})  # nothing else for others to want
            if not any(c.wants(probe) for c in conditioners):
                raise InvalidRequestError(field, value, "() unless a LoRA conditioner (t2i-lora) is installed")
        for conditioner in conditioners:
            if conditioner.wants(request):
                if conditioner.families is not None and self.family not in conditioner.families:
                    raise UnsupportedFeatureError(
                        self.family, conditioner.feature or conditioner.name, conditioner.families
                    )
                conditioner.prepare(self, request)

    def generate(self, request: GenerationRequest, *, progress: ProgressCallback | None = None) -> GenerationResult:
        """Make `request.num_images` images.

        `progress(step, total)` is called after each denoising step; if it returns ``False`` or
        raises `GenerationCancelled`, the call stops there and raises `GenerationCancelled` (the
        engine stays ready for the next request). Safe to call from several threads.
        """
        if not isinstance(request, GenerationRequest):
            raise InvalidRequestError("request", request, "a t2i_core.GenerationRequest")
        with self._lock:
            return self._generate(request, progress)

    def _generate(self, request: GenerationRequest, progress: ProgressCallback | None) -> GenerationResult:
        resolved, options = self._resolve(request)
        # Conditioners that keep state in weights shared with other engines (LoRA adapters) hold
        # it steady from conditioning to the end of the run (Conditioner.around_run).
        with contextlib.ExitStack() as turns:
            for conditioner in self._registry.ordered_conditioners():
                if conditioner.families is None or self.family in conditioner.families:
                    turns.enter_context(conditioner.around_run(self, resolved))
            return self._run(resolved, options, progress)

    def _run(
        self, resolved: GenerationRequest, options: dict[str, Any], progress: ProgressCallback | None
    ) -> GenerationResult:
        import torch

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
        if resolved.prompt_weighting is None:
            keeps_long = [
                c.weighting
                for c in self._registry.ordered_conditioners()
                if c.weighting and c.weighting.endswith("-long") and (c.families is None or self.family in c.families)
            ]
            warn_truncated_prompts(call.pipeline, call.kwargs, keeps_long[0] if keeps_long else None)
        try:
            with _quiet_truncation(call.pipeline):
                images = self.provider.run(call.pipeline, call.kwargs, progress)
        except GenerationCancelled:
            raise
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
        _warn_degenerate(images, resolved)
        return GenerationResult(images=images, seeds=seeds, request=resolved, model=self.model, family=self.family)

    def generate_batch(
        self, requests: Iterable[GenerationRequest], *, progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Make the images of several requests, in one pipeline call where they allow it; one result each.

        Requests that differ only in `prompt`, `negative_prompt` (given on all of them, or on none)
        and `seed`, with no prompt weighting and no controls, on a family that runs one diffusers
        call per request (``ModelProvider.run`` not overridden), run as one batch: image ``i`` of
        each request starts from the noise of its ``seed + i``, as alone, and matches its lone
        image up to the rounding of the batched computation (within one level of 255 per pixel on
        a CPU). Other requests run one after another, exactly as `generate` runs them. Every
        request is checked before any work. `progress` counts the steps of each call.
        """
        requests = list(requests)
        for request in requests:
            if not isinstance(request, GenerationRequest):
                raise InvalidRequestError("requests", request, "t2i_core.GenerationRequest values")
        with self._lock:
            resolved = [self._resolve(request) for request in requests]
            if len(resolved) < 2 or not self._batchable([each for each, _ in resolved]):
                return [self._generate(request, progress) for request in requests]
            first = resolved[0][0]
            with contextlib.ExitStack() as turns:
                for conditioner in self._registry.ordered_conditioners():
                    if conditioner.families is None or self.family in conditioner.families:
                        turns.enter_context(conditioner.around_run(self, first))  # the same for every request
                results = self._run_together(resolved, progress)
            return results if results is not None else [self._generate(request, progress) for request in requests]

    def _batchable(self, resolved: list[GenerationRequest]) -> bool:
        if type(self.provider).run is not ModelProvider.run:  # a family's own loop may take one prompt only
            return False
        first = resolved[0]
        if first.prompt_weighting is not None or first.controls:
            return False
        if len({request.negative_prompt is None for request in resolved}) > 1:
            return False  # None and "" are not always the same conditioning (SDXL zeroes a missing one)

        def rest(request: GenerationRequest) -> GenerationRequest:
            return request.evolve(prompt="-", negative_prompt=None, seed=0)

        return all(rest(request) == rest(first) for request in resolved[1:])

    def _run_together(
        self, resolved: list[tuple[GenerationRequest, dict[str, Any]]], progress: ProgressCallback | None
    ) -> list[GenerationResult] | None:
        """One pipeline call for compatible requests; None when their conditioned calls cannot merge."""
        import torch

        first = resolved[0][0]
        self._use_scheduler(first.scheduler or schedulers.DEFAULT)
        calls = []
        for request, options in resolved:
            call = Call(pipeline=self.pipeline, kwargs=self.provider.call_kwargs(request, options))
            for conditioner in self._registry.ordered_conditioners():
                if conditioner.wants(request):
                    conditioner.condition(self, request, call)
            warn_truncated_prompts(call.pipeline, call.kwargs)
            calls.append(call)
        merged = _merge_calls(calls)
        if merged is None:
            return None
        seeds = [
            [request.seed + i for i in range(request.num_images)] for request, _ in resolved if request.seed is not None
        ]
        merged.kwargs["generator"] = [torch.Generator("cpu").manual_seed(seed) for each in seeds for seed in each]
        count = len(merged.kwargs["generator"])
        try:
            with _quiet_truncation(merged.pipeline):
                images = self.provider.run(merged.pipeline, merged.kwargs, progress)
        except GenerationCancelled:
            raise
        except RuntimeError as exc:  # torch's out-of-memory errors are RuntimeErrors
            text = str(exc)
            if not (isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "allocate" in text):
                raise
            raise GenerationError(
                f"out of memory on {self.device} making {count} image(s) of {first.width}x{first.height} in one "
                f"batch: make smaller batches ({text.splitlines()[0] if text else type(exc).__name__})"
            ) from None
        if len(images) != count:
            raise GenerationError(f"the {self.family} pipeline made {len(images)} images for a batch of {count}")
        results = []
        for (request, _), request_seeds in zip(resolved, seeds, strict=True):
            own, images = images[: len(request_seeds)], images[len(request_seeds) :]
            _warn_degenerate(own, request)
            results.append(
                GenerationResult(images=own, seeds=request_seeds, request=request, model=self.model, family=self.family)
            )
        return results

    def _scheduler(self, name: str) -> Any:
        if name == schedulers.DEFAULT:
            return self._default_scheduler
        if name not in self._schedulers:
            self._schedulers[name] = schedulers.build(
                name, self._default_scheduler.config, self.provider.named_schedulers
            )
        return self._schedulers[name]

    def _use_scheduler(self, name: str) -> None:
        self.provider.scheduler_owner(self.pipeline).scheduler = self._scheduler(name)


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the text encoder reads; the rest of it has no effect."""


class DegenerateImageWarning(UserWarning):
    """An image came out a single flat colour: usually an overflow (guidance, half precision)."""


#: (tokenizer attribute, the pipeline argument it reads)
_TOKENIZED = (("tokenizer", "prompt"), ("tokenizer", "negative_prompt"), ("prior_tokenizer", "prompt"))


def warn_truncated_prompts(pipeline: Any, kwargs: dict[str, Any], long_weighting: str | None = None) -> None:
    """Warn, in one short line per prompt, when a text encoder will cut a prompt.

    `long_weighting` names a prompt weighting that keeps long prompts whole, for the hint.
    """
    warned: set[str] = set()
    for attribute, argument in _TOKENIZED:
        tokenizer = getattr(pipeline, attribute, None)
        text = kwargs.get(argument)
        if tokenizer is None or not isinstance(text, str) or argument in warned:
            continue
        window = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if not 0 < window < 100_000:
            continue
        ids = tokenizer(text, truncation=False, add_special_tokens=True, verbose=False).input_ids
        if len(ids) <= window:
            continue
        dropped = len(ids) - window
        words = text.split()
        head = " ".join(words[:6]) + (" ..." if len(words) > 6 else "")
        hint = f"; prompt_weighting={long_weighting!r} keeps it whole" if long_weighting else ""
        warnings.warn(
            PromptTruncatedWarning(
                f"{argument} is {len(ids)} tokens, the text encoder reads {window}: the last {dropped} "
                f"tokens are ignored ({argument} starts {head!r}{hint})"
            ),
            stacklevel=4,
        )
        warned.add(argument)


class _DropTruncationRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "truncated because" not in record.getMessage()


_DROP_TRUNCATION = _DropTruncationRecords()


@contextlib.contextmanager
def _quiet_truncation(pipeline: Any) -> Iterator[None]:
    """diffusers logs the whole cut-off text (100 KB for a 100 KB prompt); t2i has already warned."""
    # The pipeline's own module, and those of the pipelines it chains (Kandinsky's prior_pipe, ...).
    pipelines = [pipeline, *(value for value in vars(pipeline).values() if hasattr(value, "components"))]
    loggers = {logging.getLogger(type(each).__module__) for each in pipelines}
    for logger in loggers:
        logger.addFilter(_DROP_TRUNCATION)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_DROP_TRUNCATION)


def _warn_degenerate(images: list[Any], request: GenerationRequest) -> None:
    for index, image in enumerate(images):
        extrema = image.getextrema()
        bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
        if all(low == high for low, high in bands):
            warnings.warn(
                DegenerateImageWarning(
                    f"image {index} is a single flat colour {tuple(low for low, _ in bands)}: the model's output "
                    f"overflowed (guidance_scale={request.guidance_scale:g}; half precision can also overflow)"
                ),
                stacklevel=4,
            )


#: The pipeline arguments that hold one text per request in a batched call.
_PER_REQUEST_TEXTS = ("prompt", "negative_prompt")


def _merge_calls(calls: list[Call]) -> Call | None:
    """One call for several conditioned calls that differ only in their texts; None if they differ otherwise."""
    pipeline = calls[0].pipeline
    if any(call.pipeline is not pipeline for call in calls):
        return None
    missing = object()
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(key for call in calls for key in call.kwargs):
        values = [call.kwargs.get(key, missing) for call in calls]
        if key in _PER_REQUEST_TEXTS and all(isinstance(value, str) for value in values):
            merged[key] = values
            continue
        first = values[0]
        for value in values[1:]:
            try:
                same = value is first or (type(value) is type(first) and bool(value == first))
            except Exception:  # noqa: BLE001 - values that cannot be compared (tensors) are not the same
                same = False
            if not same:
                return None
        if first is not missing:
            merged[key] = first
    return Call(pipeline=pipeline, kwargs=merged)


# -- loading ---------------------------------------------------------------------------------

_cache: dict[tuple[Any, ...], Any] = {}
_cache_lock = threading.Lock()
#: one lock per cache key, so that threads asking for the same model wait for one load
_key_locks: dict[tuple[Any, ...], threading.Lock] = {}


def _cached_pipeline(
    key: tuple[Any, ...],
    model: str,
    resolved: _Resolved,
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
            _cache[key] = pipeline
        return pipeline


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
    config: str | None = None,
) -> Engine:
    """Load `model` into an `Engine`.

    :param model: a hub id, a local diffusers folder, a family alias (``"sd15"``), ``tiny:<family>``
        or a single-file checkpoint (``model.safetensors``; ``.ckpt`` only with `allow_pickle`).
    :param family: the provider to use; None detects it from ``model_index.json``.
    :param device: ``"auto"`` (cuda > mps > cpu), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    :param accelerators: accelerator or preset names, applied in phase order; None = the ``auto`` preset.
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
    resolved = _resolve_model(registry, model, family, config=config, allow_pickle=allow_pickle)
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
    key = (resolved.family, resolved.source, device, context.accelerators, allow_pickle, resolved.config)
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


def _resolve_model(
    registry: Registry, model: str, family: str | None, *, config: str | None = None, allow_pickle: bool = False
) -> _Resolved:
    if family is not None:
        registry.provider(family)  # UnknownFamilyError names the known families
    if _single_file.is_single_file(Path(model)) and not model.startswith(TINY_PREFIX):
        return _resolve_single_file(registry, model, family, config, allow_pickle)
    if config is not None:
        raise InvalidRequestError("config", config, "None unless model is a single-file checkpoint (.safetensors)")
    if model.startswith(TINY_PREFIX):
        tiny_family = model[len(TINY_PREFIX) :]
        provider = registry.provider(tiny_family)
        if family is not None and family != tiny_family:
            raise InvalidRequestError("family", family, f"{tiny_family!r} (the family of {model}) or None")
        with loading_lock:
            folder = ensure_built(provider.name, provider.tiny_version, provider.build_tiny)
        return _Resolved(source=str(folder), family=provider.name, provider=provider, is_local=True)
    for provider in registry.providers.values():
        if model in provider.aliases and (family is None or family == provider.name):
            return _Resolved(source=provider.aliases[model], family=provider.name, provider=provider, is_local=False)
    path = Path(model).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a name too long for the file system (and far too long for a hub id)
        raise ModelNotFoundError(model, f"it is neither a local folder nor a hub id ({exc.strerror or exc})") from None
    if exists:
        if not path.is_dir():
            raise ModelNotFoundError(
                model, "it is a file; expected a diffusers pipeline folder or a single-file checkpoint (.safetensors)"
            )
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
            return _Resolved(
                source=source, family=provider.name, provider=provider, is_local=is_local, model_index=index
            )
    broken = [info.name for info in registry.failures()]
    raise UndetectedFamilyError(model, index.get("_class_name"), registry.providers, broken_plugins=broken)


def _resolve_single_file(
    registry: Registry, model: str, family: str | None, config: str | None, allow_pickle: bool
) -> _Resolved:
    path = Path(model).expanduser()
    try:
        is_file = path.is_file()
    except OSError as exc:
        raise ModelNotFoundError(model, f"it is not a usable path ({exc.strerror or exc})") from None
    if not is_file:
        raise ModelNotFoundError(model, f"the single-file checkpoint {path} does not exist")
    names = _single_file.tensor_names(model, path, allow_pickle)
    provider = _single_file.detect(registry, model, names, family)
    with loading_lock:  # a tiny:<family> config may be built
        folder = _single_file.config_folder(model, provider, config)
    return _Resolved(source=str(path), family=provider.name, provider=provider, is_local=True, config=folder)


def _check_components(model: str, folder: Path, skipped: tuple[str, ...] = ()) -> None:
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


def _load_pipeline(
    model: str,
    resolved: _Resolved,
    chosen: tuple[Accelerator, ...],
    context: LoadContext,
    allow_pickle: bool,
) -> Any:
    if resolved.config is not None:
        pipeline = _load_single_file(model, resolved, chosen, context)
        return _apply_accelerators(pipeline, chosen, context)
    if resolved.is_local:
        _check_components(model, Path(resolved.source), resolved.provider.skipped_components)
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


def _load_single_file(model: str, resolved: _Resolved, chosen: tuple[Accelerator, ...], context: LoadContext) -> Any:
    assert resolved.config is not None
    load_kwargs: dict[str, Any] = {}
    for accelerator in chosen:
        load_kwargs.update(accelerator.load_kwargs(context))
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
