"""The SDXL refiner as diffusers' ensemble of expert denoisers.

The base denoises the high-noise part of the schedule and hands its latents over
(``denoising_end=f, output_type="latent"``); the refiner, a ``StableDiffusionXLImg2ImgPipeline``
that shares the base's second text encoder and VAE, denoises the rest (``denoising_start=f``).
A refiner's weights are loaded once per loaded base and shared by every engine over that base;
each engine gets its own refiner pipeline object and scheduler.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from t2i_core import InvalidRequestError, ModelNotFoundError, UnsupportedFeatureError, loading_lock
from t2i_core.kit import DEFAULT_SCHEDULER, SharedState, build_scheduler, is_offloaded, report_progress
from t2i_core.tiny import TINY_PREFIX, ensure_built

if TYPE_CHECKING:
    from PIL.Image import Image

    from t2i_core.kit import ProgressCallback

#: short names accepted as ``options["refiner"]``
REFINER_ALIASES = {"sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0"}
#: ``model_index.json`` classes that can finish an SDXL schedule (a base checkpoint can, too)
REFINER_CLASSES = ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLPipeline")
#: the base call's arguments that the refiner call receives unchanged
SHARED_ARGUMENTS = (
    "prompt",
    "prompt_2",
    "negative_prompt",
    "negative_prompt_2",
    "num_inference_steps",
    "guidance_scale",
    "num_images_per_prompt",
    "generator",
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)
_FIELD = "options['refiner']"


@attrs.frozen(kw_only=True)
class RefinerPlan:
    """What the provider's `run` needs to finish a call with a refiner."""

    #: the resolved checkpoint: a local folder or a hub id
    source: str
    high_noise_frac: float
    #: the request's scheduler name, used by the refiner too
    scheduler: str
    #: refiner-only call arguments (aesthetic scores), only those set
    extra: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.define
class _EngineRefiner:
    """One engine's refiner pipeline, with its own schedulers."""

    pipeline: Any
    default_scheduler: Any
    schedulers: dict[str, Any] = attrs.field(factory=dict)

    def use_scheduler(self, name: str) -> Any:
        if name == DEFAULT_SCHEDULER:
            self.pipeline.scheduler = self.default_scheduler
        else:
            if name not in self.schedulers:
                self.schedulers[name] = build_scheduler(name, self.default_scheduler.config)
            self.pipeline.scheduler = self.schedulers[name]
        return self.pipeline


class Refiners:
    """Resolves ``options["refiner"]`` values, and loads and runs refiners."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[str, str] = {}
        # Weights, per loaded base (keyed by the base UNet, which the refiner does not hold:
        # keying by the shared VAE would keep every entry alive forever).
        self._loaded: SharedState[dict[str, Any]] = SharedState(lambda _base: {})
        # Pipelines and schedulers, per engine (an engine's base pipeline object is its own).
        self._engines: weakref.WeakKeyDictionary[Any, dict[str, _EngineRefiner]] = weakref.WeakKeyDictionary()

    def resolve(self, value: str) -> str:
        """The folder or hub id that a refiner option names; reads at most ``model_index.json``."""
        with self._lock:
            if value in self._sources:
                return self._sources[value]
        source = self._resolve(value)
        with self._lock:
            self._sources[value] = source
        return source

    def _resolve(self, value: str) -> str:
        from t2i_core.kit import is_hub_id, read_model_index

        from . import _tiny

        if value.startswith(TINY_PREFIX):
            if value not in _tiny.TINY_REFINERS:
                raise InvalidRequestError(_FIELD, value, _allowed())
            name, version = _tiny.TINY_REFINERS[value]
            return str(ensure_built(name, version, _tiny.build_refiner))
        source = REFINER_ALIASES.get(value, value)
        path = Path(source).expanduser()
        if not path.is_dir() and (path.exists() or not is_hub_id(source, namespaced=True)):
            raise InvalidRequestError(_FIELD, value, f"{_allowed()} (there is no folder {path})")
        is_local = path.is_dir()
        if is_local:
            source = str(path)
        try:
            index = read_model_index(value, source, is_local=is_local)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(source, f"{_FIELD} names it, but {exc.reason}") from None
        if index.get("_class_name") not in REFINER_CLASSES:
            raise InvalidRequestError(
                _FIELD, value, f"an SDXL checkpoint ({' or '.join(REFINER_CLASSES)}), not {index.get('_class_name')!r}"
            )
        return source

    def for_engine(self, base: Any, source: str) -> _EngineRefiner:
        """The refiner over `base`'s engine for `source`: made once per engine, loaded once per base."""
        mine = self._engines.setdefault(base, {})
        if source not in mine:
            with self._lock:
                loaded = self._loaded.get(base)
                if source not in loaded:
                    loaded[source] = _load(base, source)
                shared = loaded[source]
            # from_pipe casts every component to torch_dtype (float32 when not given): keep the base's.
            scheduler = copy.deepcopy(shared.scheduler)
            with loading_lock:
                pipeline = type(shared).from_pipe(shared, scheduler=scheduler, torch_dtype=shared.unet.dtype)
            pipeline.set_progress_bar_config(disable=True)
            mine[source] = _EngineRefiner(pipeline=pipeline, default_scheduler=pipeline.scheduler)
        return mine[source]

    def run(
        self, base: Any, kwargs: Mapping[str, Any], plan: RefinerPlan, progress: ProgressCallback | None
    ) -> list[Image]:
        """The ensemble: `base` up to ``plan.high_noise_frac`` of the schedule, the refiner after it."""
        refiner = self.for_engine(base, plan.source).use_scheduler(plan.scheduler)
        fraction = plan.high_noise_frac
        steps = kwargs["num_inference_steps"]
        high = _steps_before(base.scheduler, steps, fraction)
        low = len(_timesteps(refiner.scheduler, steps)) - _steps_before(refiner.scheduler, steps, fraction)
        if high == 0 or low == 0:
            raise InvalidRequestError(
                "options['high_noise_frac']",
                fraction,
                f"a fraction that leaves steps to both the base ({high}) and the refiner ({low}) "
                f"at num_inference_steps={steps}: more steps, or a fraction nearer 0.5",
            )
        base_kwargs = {**kwargs, "denoising_end": fraction, "output_type": "latent"}
        refiner_kwargs = {name: kwargs[name] for name in SHARED_ARGUMENTS if name in kwargs}
        refiner_kwargs.update(plan.extra, denoising_start=fraction)
        if progress is not None:
            total = high + low
            base_kwargs["callback_on_step_end"] = _progress(progress, 0, total)
            refiner_kwargs["callback_on_step_end"] = _progress(progress, high, total)
        latents = base(**base_kwargs).images
        return list(refiner(image=latents, **refiner_kwargs).images)


def _allowed() -> str:
    from . import _tiny

    named = ", ".join(repr(name) for name in (*_tiny.TINY_REFINERS, *REFINER_ALIASES))
    return f"{named}, a local SDXL refiner folder or a hub id"


def _load(base: Any, source: str) -> Any:
    """Load the refiner with the base's second text encoder and VAE, dtype and device."""
    import torch

    from t2i_core.kit import has_variant

    with loading_lock:
        from diffusers import StableDiffusionXLImg2ImgPipeline

    if _offloaded(base):
        raise UnsupportedFeatureError("sdxl", "the refiner with CPU offloading (cpu_offload, sequential_offload)")
    dtype = base.unet.dtype
    kwargs: dict[str, Any] = {
        "text_encoder_2": base.text_encoder_2,
        "vae": base.vae,
        "torch_dtype": dtype,
        "use_safetensors": True,
    }
    if dtype == torch.float16 and has_variant(source, "fp16"):
        kwargs["variant"] = "fp16"
    try:
        with loading_lock:
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(source, **kwargs)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelNotFoundError(
            source, f"diffusers could not load it as an SDXL refiner ({type(exc).__name__}: {reason})"
        ) from exc
    # Only the refiner's UNet is its own: the shared modules are in place already.
    return refiner.to(base.device) if refiner.unet.device != base.device else refiner


def _offloaded(base: Any) -> bool:
    # Offloading hooks move shared modules on and off the GPU around the base's calls; a refiner
    # placed with .to() beside them would meet its inputs on the wrong device.
    shared = (base.unet, base.text_encoder_2, base.vae)
    return any(is_offloaded(component) for component in shared)


def _timesteps(scheduler: Any, steps: int) -> Any:
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(steps)
    return probe.timesteps


def _steps_before(scheduler: Any, steps: int, fraction: float) -> int:
    """How many steps of the schedule lie before `fraction` (diffusers' ``denoising_end`` rule)."""
    trained = scheduler.config.num_train_timesteps
    cutoff = round(trained - fraction * trained)
    return int((_timesteps(scheduler, steps) >= cutoff).sum())


def _progress(progress: ProgressCallback, done: int, total: int) -> Callable[..., dict[str, Any]]:
    def on_step_end(_pipeline: Any, step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        report_progress(progress, done + step + 1, total)
        return callback_kwargs

    return on_step_end
