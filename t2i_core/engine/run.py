"""`Engine`: a loaded model that turns requests into images, one run path for one request or many.

Generating checks the request (`checks`), fills in the family's defaults, lets the conditioners
build the pipeline call, has the provider run it and wraps the images in a `GenerationResult`.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import threading
from collections.abc import Iterable
from typing import Any

from .. import schedulers
from .._progress import ProgressCallback
from ..accelerator import Accelerator
from ..conditioner import Call
from ..errors import GenerationCancelled, GenerationError, InvalidRequestError
from ..prompt_tags import EMBEDDING_DIRS_ENV, LORA_DIRS_ENV, dirs_from_env, expand_prompt
from ..provider import ModelProvider
from ..registry import Registry
from ..request import GenerationRequest, GenerationResult
from .checks import check_pixels, check_request, default_max_pixels
from .hires import check_hires, run_hires
from .own_thread import OwnThread
from .prompts import quiet_truncation, warn_degenerate, warn_truncated_prompts

#: Out-of-memory errors that torch raises as plain RuntimeErrors (no type of their own), by the
#: text this torch version gives them (pinned by tests/test_engine_errors.py).
OUT_OF_MEMORY_TEXTS = ("DefaultCPUAllocator: can't allocate memory", "MPS backend out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is torch running out of device memory: by type (CUDA, and torch >= 2.5's
    ``torch.OutOfMemoryError``), else by the text of the allocators that raise a plain RuntimeError."""
    import torch

    types = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})
    if isinstance(exc, types):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in OUT_OF_MEMORY_TEXTS)


class Engine:
    """A loaded model, with its accelerators applied, ready to generate images.

    An engine is safe to share between threads: calls to `generate` on one engine run one at
    a time, in the order they came, on the engine's own thread (callers wait; progress callbacks
    are called on that thread), and each gives exactly the images it would give alone. Engines
    from the same cached `load()` share the weights and run in parallel.
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
        self.model: str = model
        """The model as it was asked for: a hub id, an alias (``sd15``), a folder, a file or a ``tiny:``
        name.
        """
        self.source: str = source
        """Where it was loaded from: the hub id an alias stands for, a folder or a file."""
        self.family: str = family
        """The family it was loaded as (``sd15``, ``flux``...)."""
        self.provider: ModelProvider = provider
        """The family's `ModelProvider`, which loads and runs the pipeline."""
        self.pipeline: Any = pipeline
        """The diffusers pipeline, accelerators applied: reach its components (``engine.pipeline.unet``,
        ``.vae``, ``.scheduler``) or replace them, as with a pipeline you made yourself. Engines from
        the same cached `load()` share it.
        """
        self.device: str = device
        """The device it runs on, resolved (``cpu``, ``cuda``, ``cuda:1``, ``mps``; never ``auto``)."""
        self.accelerators: tuple[str, ...] = tuple(a.spec for a in accelerators)
        """The accelerators applied, as written, in application order (``fp16``,
        ``first-block-cache@0.2``).
        """
        self._accelerators = accelerators
        self.state: dict[str, Any] = {}
        """Per-engine state of conditioners and accelerators (a Compel instance, ControlNets, ...)."""
        self._registry = registry
        owner = provider.scheduler_owner(pipeline)
        self._default_scheduler = owner.scheduler
        self._schedulers: dict[str, Any] = {}
        self._step_limits: dict[str, int] = {}
        self.max_pixels: int = default_max_pixels()
        """The largest height x width a request may ask for (default 2048 x 2048, or ``$T2I_MAX_PIXELS``);
        a larger request is refused before any work. Set it to allow more.
        """
        self.lora_dirs: tuple[str, ...] = dirs_from_env(LORA_DIRS_ENV)
        """The folders whose ``.safetensors`` files a prompt's ``<lora:NAME:WEIGHT>`` tags name (see
        `expand_prompt`); default: ``$T2I_LORA_DIR`` (``os.pathsep``-separated), else none.
        """
        self.embedding_dirs: tuple[str, ...] = dirs_from_env(EMBEDDING_DIRS_ENV)
        """The folders of textual-inversion embeddings a prompt uses by their file names (see
        `expand_prompt`); default: ``$T2I_EMBEDDINGS_DIR``, else none.
        """
        self._lock = threading.RLock()
        self._own_thread = OwnThread()

    def __repr__(self) -> str:
        return f"Engine(model={self.model!r}, family={self.family!r}, device={self.device!r}, accelerators={self.accelerators!r})"

    def resolve(self, request: GenerationRequest) -> tuple[GenerationRequest, dict[str, Any]]:
        """Check `request` against this engine and fill in defaults and the seed; no image work."""
        if not isinstance(request, GenerationRequest):
            raise InvalidRequestError("request", request, "a t2i_core.GenerationRequest")
        with self._lock:
            resolved, options = self._resolve(request)
            return _as_written(resolved, request), options

    def expand(self, request: GenerationRequest) -> GenerationRequest:
        """`request` as this engine runs it: its ``<lora:...>`` tags and embedding words turned into
        `Lora` and `Embedding` values from `lora_dirs` and `embedding_dirs` (`t2i_core.expand_prompt`)."""
        return expand_prompt(request, lora_dirs=self.lora_dirs, embedding_dirs=self.embedding_dirs)

    def _resolve(self, request: GenerationRequest) -> tuple[GenerationRequest, dict[str, Any]]:
        request = self.expand(request)
        options = check_request(
            self._registry, self.provider, request, max_pixels=self.max_pixels, step_limit=self._step_limit
        )
        defaults = self.provider.pipeline_defaults(self.pipeline)
        native_height, native_width = self.provider.native_size(self.pipeline)
        resolved = request.evolve(
            height=request.height or defaults.height or native_height,
            width=request.width or defaults.width or native_width,
            num_inference_steps=request.num_inference_steps or defaults.num_inference_steps,
            guidance_scale=defaults.guidance_scale if request.guidance_scale is None else request.guidance_scale,
            seed=secrets.randbelow(2**32) if request.seed is None else request.seed,
            scheduler=request.scheduler or schedulers.DEFAULT,
        )
        assert resolved.height is not None and resolved.width is not None
        check_pixels(resolved.height, resolved.width, self.max_pixels)
        self.provider.check_request(self.pipeline, resolved)
        if resolved.hires is not None:
            check_hires(self, resolved, self._scheduler(resolved.scheduler or schedulers.DEFAULT))
        for conditioner in self._registry.ordered_conditioners():
            if conditioner.wants(request):
                conditioner.prepare(self, request)
        return resolved, options

    def _step_limit(self, name: str) -> int:
        """The most inference steps scheduler `name` can run (its timesteps must index its training schedule)."""
        if name not in self._step_limits:
            self._step_limits[name] = schedulers.max_steps(self._scheduler(name))
        return self._step_limits[name]

    def generate(self, request: GenerationRequest, *, progress: ProgressCallback | None = None) -> GenerationResult:
        """Make `request.num_images` images.

        `progress(step, total)` is called after each denoising step; if it returns ``False`` or
        raises `GenerationCancelled`, the call stops there and raises `GenerationCancelled` (the
        engine stays ready for the next request). Safe to call from several threads.
        """
        if not isinstance(request, GenerationRequest):
            raise InvalidRequestError("request", request, "a t2i_core.GenerationRequest")

        def work() -> GenerationResult:
            with self._lock:
                results = self._run([self._resolve(request)], self._own_thread.cancellable(progress))
                assert results is not None  # a single call always runs
                return _written(results[0], request)

        return self._own_thread.call(work)  # on the engine's own thread (see engine/own_thread.py)

    def generate_batch(
        self, requests: Iterable[GenerationRequest], *, progress: ProgressCallback | None = None
    ) -> list[GenerationResult]:
        """Make the images of several requests, in one pipeline call where they allow it; one result each.

        Requests that differ only in `prompt`, `negative_prompt` (given on all of them, or on none)
        and `seed`, with no prompt weighting and no controls, on a family that runs one diffusers
        call per request (``ModelProvider.run`` not overridden) and with no accelerator that must
        see each call alone (``Accelerator.batches``, the step caches), run as one batch: image ``i`` of
        each request starts from the noise of its ``seed + i``, as alone, and matches its lone
        image up to the rounding of the batched computation (within one level of 255 per pixel on
        a CPU). Other requests run one after another, exactly as `generate` runs them. Every
        request is checked before any work. `progress` counts the steps of each call.
        """
        requests = list(requests)
        for request in requests:
            if not isinstance(request, GenerationRequest):
                raise InvalidRequestError("requests", request, "t2i_core.GenerationRequest values")
        checked = self._own_thread.cancellable(progress)

        def work() -> list[GenerationResult]:
            with self._lock:
                resolved = [self._resolve(request) for request in requests]
                if len(resolved) > 1 and self._batchable([each for each, _ in resolved]):
                    together = self._run(resolved, checked)
                    if together is not None:
                        return [_written(result, r) for result, r in zip(together, requests, strict=True)]
                results: list[GenerationResult] = []
                for each in resolved:
                    alone = self._run([each], checked)
                    assert alone is not None
                    results.extend(alone)
                return [_written(result, r) for result, r in zip(results, requests, strict=True)]

        return self._own_thread.call(work)

    def _batchable(self, resolved: list[GenerationRequest]) -> bool:
        if type(self.provider).run is not ModelProvider.run:  # a family's own loop may take one prompt only
            return False
        if not all(accelerator.batches for accelerator in self._accelerators):
            return False  # a step cache decides per call: a batch would change each request's images
        first = resolved[0]
        if first.prompt_weighting is not None or first.controls or first.hires is not None:
            return False
        if len({request.negative_prompt is None for request in resolved}) > 1:
            return False  # None and "" are not always the same conditioning (SDXL zeroes a missing one)

        def rest(request: GenerationRequest) -> GenerationRequest:
            return request.evolve(prompt="-", negative_prompt=None, seed=0)

        return all(rest(request) == rest(first) for request in resolved[1:])

    def _run(
        self, resolved: list[tuple[GenerationRequest, dict[str, Any]]], progress: ProgressCallback | None
    ) -> list[GenerationResult] | None:
        """The one run path: condition each request's call, run them as one pipeline call, split the images.

        Several requests (`generate_batch`) share every setting but their texts and seeds; None when
        their conditioned calls cannot merge into one call (then each runs alone).
        """
        import torch

        first = resolved[0][0]
        conditioners = self._registry.ordered_conditioners()
        # Conditioners that keep state in weights shared with other engines (LoRA adapters) hold
        # it steady from conditioning to the end of the run (Conditioner.around_run).
        with contextlib.ExitStack() as turns:
            for conditioner in conditioners:
                if conditioner.families is None or self.family in conditioner.families:
                    turns.enter_context(conditioner.around_run(self, first))  # the same for every request
            # Accelerators with per-run state in shared weights (step caches) likewise (Accelerator.around_run).
            for accelerator in self._accelerators:
                turns.enter_context(accelerator.around_run(self, first))
            self._use_scheduler(first.scheduler or schedulers.DEFAULT)
            calls = [self._conditioned(request, options, conditioners) for request, options in resolved]
            call = calls[0] if len(calls) == 1 else merge_calls(calls)
            if call is None:
                return None
            seeds = [
                [request.seed + i for i in range(request.num_images)]
                for request, _ in resolved
                if request.seed is not None
            ]
            generators = [torch.Generator("cpu").manual_seed(seed) for each in seeds for seed in each]
            call.kwargs["generator"] = generators[0] if len(generators) == 1 else generators
            try:
                with quiet_truncation(call.pipeline):
                    if first.hires is None:
                        images = self.provider.run(call.pipeline, call.kwargs, progress)
                    else:  # never batched (`_batchable`): one request
                        again = functools.partial(self._conditioned, options=resolved[0][1], conditioners=conditioners)
                        images = run_hires(self, call, first, again, progress)
            except GenerationCancelled:
                raise
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                raise self._out_of_memory(exc, first, len(generators), together=len(resolved) > 1) from None
        if len(images) != len(generators):
            raise GenerationError(f"the {self.family} pipeline made {len(images)} images for {len(generators)}")
        results = []
        for (request, _), request_seeds in zip(resolved, seeds, strict=True):
            own, images = images[: len(request_seeds)], images[len(request_seeds) :]
            warn_degenerate(own, request)
            results.append(
                GenerationResult(
                    images=own,
                    seeds=request_seeds,
                    request=request,
                    model=self.model,
                    family=self.family,
                    accelerators=self.accelerators,
                )
            )
        return results

    def _conditioned(self, request: GenerationRequest, options: dict[str, Any], conditioners: list[Any]) -> Call:
        """The pipeline call for one resolved request, after every conditioner that wants it."""
        call = Call(pipeline=self.pipeline, kwargs=self.provider.call_kwargs(request, options))
        for conditioner in conditioners:
            if conditioner.wants(request):
                conditioner.condition(self, request, call)
        if request.prompt_weighting is None:
            keeps_long = [
                c.weighting
                for c in conditioners
                if c.weighting and c.weighting.endswith("-long") and (c.families is None or self.family in c.families)
            ]
            warn_truncated_prompts(call.pipeline, call.kwargs, keeps_long[0] if keeps_long else None)
        return call

    def _out_of_memory(
        self, exc: Exception, first: GenerationRequest, count: int, *, together: bool
    ) -> GenerationError:
        text = str(exc)
        detail = text.splitlines()[0] if text else type(exc).__name__
        if together:
            return GenerationError(
                f"out of memory on {self.device} making {count} image(s) of {first.width}x{first.height} in one "
                f"batch: make smaller batches ({detail})"
            )
        return GenerationError(
            f"out of memory on {self.device} making {count} image(s) of "
            f"{first.width}x{first.height}: lower the size or num_images, or load with "
            f"the low-memory preset ({detail})"
        )

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


def _as_written(run: GenerationRequest, written: GenerationRequest) -> GenerationRequest:
    """The request `run` (expanded by `Engine.expand`, defaults filled in) with the prompt, LoRAs and
    embeddings as `written`: what results report and PNGs keep, so that running it again expands it again."""
    fields = ("prompt", "loras", "embeddings", "hires")
    if all(getattr(run, name) == getattr(written, name) for name in fields):
        return run
    return run.evolve(**{name: getattr(written, name) for name in fields})


def _written(result: GenerationResult, written: GenerationRequest) -> GenerationResult:
    """`result` reporting `written`'s prompt, and the LoRAs and embeddings its prompt added apart."""
    import attrs

    run = result.request
    request = _as_written(run, written)
    if request is run:
        return result
    return attrs.evolve(
        result,
        request=request,
        prompt_loras=run.loras[len(written.loras) :],
        prompt_embeddings=run.embeddings[len(written.embeddings) :],
    )


#: The pipeline arguments that hold one text per request in a batched call.
_PER_REQUEST_TEXTS = ("prompt", "negative_prompt")


def merge_calls(calls: list[Call]) -> Call | None:
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
