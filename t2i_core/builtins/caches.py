"""Step caches: diffusers' cache hooks (``enable_cache``) on the denoiser, reusing work between steps.

``first-block-cache``, ``taylorseer``, ``magcache`` and ``faster-cache`` each call the
denoiser's ``enable_cache`` with diffusers' config of the same name, exactly as a diffusers user
would. They are lossy: a skipped step reuses (or extrapolates) an earlier step's output, so
images change. diffusers gives cache hooks only to transformers that inherit ``CacheMixin``
(FLUX.1's ``FluxTransformer2DModel`` among the shipped families); the others are refused
before any weights load. ``docs/optimize.md`` ("Step caches") has the measured costs.

The hooks keep state from one step to the next inside the denoiser, which engines over the same
cached weights share: each run takes the weights' lock and starts from fresh state
(`Accelerator.around_run`), and requests are never merged into one call (`Accelerator.batches`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from t2i_core import (
    Accelerator,
    AcceleratorParameter,
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    LoadContext,
    T2IError,
)
from t2i_core.kit import DENOISER_ATTRIBUTES, SharedState, denoiser, is_hub_id, read_model_index

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from t2i_core import Engine, GenerationRequest

#: the step caches, one at a time: diffusers refuses a second ``enable_cache``
CACHES = ("first-block-cache", "taylorseer", "magcache", "faster-cache")

#: denoiser class -> the name of diffusers' published MagCache ratios for it (in ``diffusers.hooks.mag_cache``)
MAG_RATIOS = {"FluxTransformer2DModel": "FLUX_MAG_RATIOS"}

#: denoiser classes that are guidance-distilled (no unconditional branch in the batch), for
#: which FasterCache's settings are known: it reuses attention outputs only
GUIDANCE_DISTILLED = ("FluxTransformer2DModel",)

#: the conflicts of every step cache besides the other caches: group offloading, whose prefetching
#: (CUDA streams) follows the order layers ran in on the first step, so a layer a later step skips
#: leaves the next one on the CPU; regional compile, which compiles each block whole
#: (``fullgraph=True``) and cannot trace the hooks' ``torch.compiler.disable``d decisions
_CONFLICTS = ("group_offload", "compile-regional")


class _Weights:
    """What the caches keep per set of loaded weights (shared by the engines over them)."""

    def __init__(self) -> None:
        #: held for a whole run: the hooks' state belongs to one pipeline call at a time
        self.lock = threading.Lock()
        #: the pipeline running now (weakly: the weights must not keep themselves alive)
        self.running: weakref.ref[Any] | None = None
        #: the number of steps the MagCache config was made for
        self.steps: int | None = None

    def current_timestep(self) -> Any:
        """The running pipeline's ``current_timestep`` (FasterCache's ``current_timestep_callback``)."""
        pipeline = self.running() if self.running is not None else None
        return None if pipeline is None else pipeline.current_timestep


_WEIGHTS: SharedState[_Weights] = SharedState(lambda pipeline: _Weights())


class _StepCache(Accelerator):
    phase = "cache"
    lossless = False
    batches = False
    #: the paper or method, for messages
    technique: ClassVar[str]

    def check(self, context: LoadContext) -> None:
        if "compile" in context.accelerators and context.device.split(":", 1)[0] == "cuda":
            # compile captures CUDA graphs there, and a graph's next replay overwrites its outputs,
            # while the cache keeps some of them (residuals, attention outputs) for later steps.
            raise IncompatibleAcceleratorsError(
                [self.name, "compile"],
                f"{self.name} keeps a step's outputs for later steps, and compile's CUDA graphs overwrite "
                "them at the next step on CUDA; use the cache without compile",
            )
        found = _indexed_denoiser(context)
        if found is None:
            return  # a single file, or a class diffusers does not name: decided once loaded
        component, class_name, model_class = found
        problem = self.problem(class_name, model_class)
        if problem is not None:
            raise IncompatibleAcceleratorsError(
                [self.name], f"family {context.family!r} runs its {component} {class_name}: {problem}"
            )

    def problem(self, class_name: str, model_class: type | None) -> str | None:
        """Why this cache cannot run on denoiser class `model_class` (named `class_name`), or None."""
        if model_class is None:
            return None
        from diffusers.models.cache_utils import CacheMixin

        if not issubclass(model_class, CacheMixin):
            import diffusers

            return (
                f"diffusers {diffusers.__version__} has no cache hooks for it (enable_cache is only on CacheMixin "
                "transformers, such as FLUX.1's FluxTransformer2DModel)"
            )
        return None

    def apply(self, pipeline: Any, context: LoadContext) -> None:
        model = denoiser(pipeline)
        problem = self.problem(type(model).__name__, type(model))
        if problem is not None:
            raise IncompatibleAcceleratorsError(
                [self.name], f"family {context.family!r} runs {type(model).__name__}: {problem}"
            )
        weights = _WEIGHTS.get(pipeline)
        weights.running = weakref.ref(pipeline)
        try:
            model.enable_cache(self.config(pipeline, model, weights, context))
        except (ValueError, IndexError, KeyError) as exc:  # blocks diffusers cannot hook
            raise IncompatibleAcceleratorsError(
                [self.name], f"diffusers cannot apply {self.technique} to {type(model).__name__}: {exc}"
            ) from exc

    def config(self, pipeline: Any, model: Any, weights: _Weights, context: LoadContext) -> Any:
        """The diffusers cache config for `pipeline`'s denoiser `model`."""
        raise NotImplementedError

    def around_run(self, engine: Engine, request: GenerationRequest) -> AbstractContextManager[Any]:
        return self._turn(engine, request)

    @contextlib.contextmanager
    def _turn(self, engine: Engine, request: GenerationRequest) -> Iterator[None]:
        self.check_request(request)
        pipeline = engine.pipeline
        weights = _WEIGHTS.get(pipeline)
        with weights.lock:
            model = denoiser(pipeline)
            weights.running = weakref.ref(pipeline)
            self.before_run(model, weights, request)
            # What a pipeline call does when it ends; a cancelled or failed run never got there.
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
            yield

    def check_request(self, request: GenerationRequest) -> None:
        """Refuse a request this cache cannot run correctly (`InvalidRequestError`)."""

    def before_run(self, model: Any, weights: _Weights, request: GenerationRequest) -> None:
        """Adapt the cache to `request` before its run (under the weights' lock)."""


def _indexed_denoiser(context: LoadContext) -> tuple[str, str, type | None] | None:
    """(component, class name, diffusers class or None) of the denoiser ``model_index.json`` names."""
    source = context.source
    if Path(source).is_dir():
        local = True
    elif is_hub_id(source):
        local = False
    else:
        return None  # a single file: its configs come from elsewhere
    try:
        index = read_model_index(context.model, source, local)
    except T2IError:
        return None  # loading says what is wrong
    for component in DENOISER_ATTRIBUTES:
        entry = index.get(component)
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            library, class_name = entry
            if library != "diffusers":
                return component, class_name, None
            import diffusers

            return component, class_name, getattr(diffusers, class_name, None)
    return None


class FirstBlockCache(_StepCache):
    name = "first-block-cache"
    technique = "First Block Cache"
    conflicts = tuple(c for c in CACHES if c != "first-block-cache") + _CONFLICTS
    parameter = AcceleratorParameter(
        name="threshold",
        kind=float,
        default=0.2,
        minimum=0.0,
        maximum=1.0,
        description="how little the first block's output must change, relative to the last full step, to skip the rest",
    )
    description = (
        "First Block Cache (diffusers FirstBlockCacheConfig): runs only the first transformer block while its "
        "output barely changes and reuses the rest's last change; lossy"
    )

    def config(self, pipeline: Any, model: Any, weights: _Weights, context: LoadContext) -> Any:
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.value)


class TaylorSeer(_StepCache):
    name = "taylorseer"
    technique = "TaylorSeer"
    conflicts = tuple(c for c in CACHES if c != "taylorseer") + _CONFLICTS
    parameter = AcceleratorParameter(
        name="cache_interval",
        kind=int,
        default=5,
        minimum=1,
        description="the steps between full computations of the attention layers",
    )
    description = (
        "TaylorSeer (diffusers TaylorSeerCacheConfig): computes attention every few steps and predicts it in "
        "between from a Taylor expansion of its past outputs; lossy"
    )

    def config(self, pipeline: Any, model: Any, weights: _Weights, context: LoadContext) -> Any:
        from diffusers import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(cache_interval=self.value)


class MagCache(_StepCache):
    name = "magcache"
    technique = "MagCache"
    conflicts = tuple(c for c in CACHES if c != "magcache") + _CONFLICTS
    parameter = AcceleratorParameter(
        name="threshold",
        kind=float,
        default=0.06,
        minimum=0.0,
        maximum=1.0,
        description="the error it may accumulate over skipped steps before it computes again",
    )
    description = (
        "MagCache (diffusers MagCacheConfig with its published magnitude ratios, FLUX.1 only): skips steps "
        "while the calibrated change of the residual stays small; lossy"
    )

    def problem(self, class_name: str, model_class: type | None) -> str | None:
        problem = super().problem(class_name, model_class)
        if problem is None and class_name not in MAG_RATIOS:
            known = ", ".join(sorted(MAG_RATIOS))
            problem = (
                f"MagCache needs magnitude ratios calibrated for the model, and diffusers publishes them only for "
                f"{known} (FLUX.1); calibrate with diffusers' MagCacheConfig(calibrate=True) (docs/optimize.md)"
            )
        return problem

    def config(self, pipeline: Any, model: Any, weights: _Weights, context: LoadContext) -> Any:
        weights.steps = context.provider.pipeline_defaults(pipeline).num_inference_steps
        return self.config_for(model, weights.steps)

    def config_for(self, model: Any, steps: int | None) -> Any:
        from diffusers import MagCacheConfig
        from diffusers.hooks import mag_cache

        ratios = getattr(mag_cache, MAG_RATIOS[type(model).__name__])
        if steps is None:
            return MagCacheConfig(threshold=self.value, mag_ratios=ratios)
        return MagCacheConfig(threshold=self.value, mag_ratios=ratios, num_inference_steps=steps)

    def before_run(self, model: Any, weights: _Weights, request: GenerationRequest) -> None:
        # The ratios are interpolated to the run's number of steps, which each request may change.
        steps = request.num_inference_steps
        if steps is not None and steps != weights.steps:
            model.disable_cache()
            model.enable_cache(self.config_for(model, steps))
            weights.steps = steps


class FasterCache(_StepCache):
    name = "faster-cache"
    technique = "FasterCache"
    conflicts = tuple(c for c in CACHES if c != "faster-cache") + _CONFLICTS
    parameter = AcceleratorParameter(
        name="block_skip_range",
        kind=int,
        default=2,
        minimum=1,
        description="the steps between full computations of each attention layer",
    )
    description = (
        "FasterCache (diffusers FasterCacheConfig, guidance-distilled FLUX.1): late in denoising, computes "
        "attention every few steps and extrapolates it in between; lossy; no negative prompt"
    )

    def problem(self, class_name: str, model_class: type | None) -> str | None:
        problem = super().problem(class_name, model_class)
        if problem is None and class_name not in GUIDANCE_DISTILLED:
            problem = (
                "t2i runs FasterCache only on guidance-distilled transformers ("
                + ", ".join(GUIDANCE_DISTILLED)
                + "), whose settings diffusers tests; its skipping of the unconditional branch needs a pipeline "
                "that batches it"
            )
        return problem

    def config(self, pipeline: Any, model: Any, weights: _Weights, context: LoadContext) -> Any:
        from diffusers import FasterCacheConfig

        return FasterCacheConfig(
            spatial_attention_block_skip_range=self.value,
            attention_weight_callback=_half,
            is_guidance_distilled=True,
            current_timestep_callback=weights.current_timestep,
        )

    def check_request(self, request: GenerationRequest) -> None:
        if request.negative_prompt is not None:
            raise InvalidRequestError(
                "negative_prompt",
                request.negative_prompt,
                f"None on an engine with {self.spec}: FasterCache keeps one attention state per layer, and true "
                "CFG runs a second, negative branch through the same layers, whose outputs it would mix; load "
                "without faster-cache (or with another step cache) for negative prompts",
            )


def _half(_module: Any) -> float:
    """FasterCache's attention weight: diffusers' own default of 0.5 at every step, given explicitly."""
    return 0.5


ACCELERATORS: tuple[Accelerator, ...] = (FirstBlockCache(), TaylorSeer(), MagCache(), FasterCache())
