"""Hires fix (`HiresFix`): the request made at its own size, enlarged, then denoised again at the
larger size by the family's image-to-image pipeline, built over the loaded components.

First pass: the conditioned call with ``output_type="latent"`` (``"pil"`` for ``lanczos``).
Upscale: the latents interpolated to (H / f, W / f), f the VAE factor (bilinear without antialias,
or nearest-exact), or the images resized with PIL's LANCZOS. Second pass: the img2img pipeline
over them with the hires strength and steps, the first pass's scheduler and a fresh generator per
image from the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._progress import ProgressCallback, report_progress, takes_latents
from ..errors import InvalidRequestError, UnsupportedFeatureError
from ..provider import ModelProvider
from ..request import GenerationRequest
from .checks import HIRES_FEATURE, check_pixels

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..conditioner import Call
    from .run import Engine

#: The smallest second-pass side.
SIZE_MULTIPLE = 8
#: The key of an engine's image-to-image pipeline in `Engine.state`.
STATE_KEY = "t2i_core.hires"


def target_size(request: GenerationRequest) -> tuple[int, int]:
    """The (width, height) of the second pass of a resolved hires `request` (`HiresFix.size`)."""
    assert request.hires is not None and request.width is not None and request.height is not None
    return request.hires.size(request.width, request.height)


def check_hires(engine: Engine, request: GenerationRequest, scheduler: Any) -> None:
    """Refuse a resolved hires `request` whose second pass the engine cannot run (its size, or a strength
    that leaves it no step with `scheduler`), naming the hires field."""
    hires = request.hires
    assert hires is not None
    # A step cache keeps per-call state in the denoiser's hooks, and the img2img pipelines open no
    # cache context for it (diffusers 0.42): its second pass would fail or reuse the first's state.
    caches = [accelerator.spec for accelerator in engine._accelerators if not accelerator.batches]
    if caches:
        raise UnsupportedFeatureError(engine.family, f"{HIRES_FEATURE} together with the step cache {caches[0]!r}")
    width, height = target_size(request)
    field, value = "hires.scale", hires.scale
    if hires.width is not None:
        field, value = "hires.width", hires.width
    elif hires.height is not None:
        field, value = "hires.height", hires.height
    size = f"{width}x{height}"
    if min(width, height) < SIZE_MULTIPLE:
        raise InvalidRequestError(field, value, f"a value that gives a second pass of at least 8x8 pixels, not {size}")
    try:
        check_pixels(height, width, engine.max_pixels)
        engine.provider.check_request(engine.pipeline, request.evolve(width=width, height=height, hires=None))
    except InvalidRequestError as exc:
        raise InvalidRequestError(
            field, value, f"a value whose second-pass size ({size}) the engine accepts: {exc}"
        ) from None
    steps = hires.steps or request.num_inference_steps
    assert steps is not None
    if second_pass_steps(img2img_for(engine), steps, hires.strength, scheduler) < 1:
        raise InvalidRequestError(
            "hires.strength",
            hires.strength,
            f"a strength that leaves the second pass at least one of its {steps} steps (or more hires.steps)",
        )


def run_hires(
    engine: Engine,
    call: Call,
    request: GenerationRequest,
    recondition: Callable[[GenerationRequest], Call],
    progress: ProgressCallback | None,
) -> list[Image]:
    """Both passes of the resolved hires `request`, whose first pass is the conditioned `call`.

    `recondition` conditions a request whose texts the hires prompts replace.
    """
    hires = request.hires
    assert hires is not None and request.height is not None and request.width is not None
    provider = engine.provider
    if call.pipeline is not engine.pipeline:
        raise UnsupportedFeatureError(engine.family, f"{HIRES_FEATURE} with a conditioner that replaces the pipeline")
    img2img = img2img_for(engine)
    width, height = target_size(request)
    second = second_pass_kwargs(engine, call, request, recondition, img2img, width, height)
    first = {**call.kwargs, "output_type": "pil" if hires.upscaler == "lanczos" else "latent"}
    counted = second_pass_steps(img2img, second["num_inference_steps"], hires.strength)
    first_progress, second_progress = split_progress(progress, counted)
    made = provider.run(call.pipeline, first, first_progress)
    second["image"] = upscale(provider, call.pipeline, made, request, width, height)
    return provider.run(img2img, second, second_progress)


def upscale(
    provider: ModelProvider, pipeline: Any, made: list[Any], request: GenerationRequest, width: int, height: int
) -> Any:
    """The first pass's output enlarged to `width` x `height`: latents (batch, channels, H / f, W / f), or images."""
    hires = request.hires
    assert hires is not None and request.height is not None and request.width is not None
    if hires.upscaler == "lanczos":
        from PIL import Image

        return [image.resize((width, height), Image.LANCZOS) for image in made]
    import torch

    latents = provider.hires_latents(pipeline, torch.stack(list(made)), request.height, request.width)
    factor = int(pipeline.vae_scale_factor)
    mode = "bilinear" if hires.upscaler == "latent" else "nearest-exact"
    return torch.nn.functional.interpolate(
        latents, size=(height // factor, width // factor), mode=mode, antialias=False
    )


def img2img_for(engine: Engine) -> Any:
    """The engine's image-to-image pipeline over its components, made once (again if a component was
    replaced), with the scheduler the first pass runs."""
    pipeline = engine.pipeline
    components = {name: c for name, c in pipeline.components.items() if name != "scheduler"}
    key = tuple((name, id(component)) for name, component in components.items())
    cached = engine.state.get(STATE_KEY)
    if cached is None or cached[0] != key:
        made = engine.provider.img2img_pipeline(pipeline)
        if hasattr(made, "set_progress_bar_config"):
            made.set_progress_bar_config(disable=True)
        cached = engine.state[STATE_KEY] = (key, made)
    img2img = cached[1]
    img2img.scheduler = engine.provider.scheduler_owner(pipeline).scheduler
    return img2img


def second_pass_kwargs(
    engine: Engine,
    call: Call,
    request: GenerationRequest,
    recondition: Callable[[GenerationRequest], Call],
    img2img: Any,
    width: int,
    height: int,
) -> dict[str, Any]:
    """The img2img call: the first pass's arguments (its prompt embeddings too, unless the hires prompts
    replace the texts), the hires strength, steps and size, and fresh generators; no ``image`` yet."""
    import torch

    from .._progress import _call_parameters

    hires = request.hires
    assert hires is not None and request.seed is not None
    changes = {
        name: value
        for name, value in (("prompt", hires.prompt), ("negative_prompt", hires.negative_prompt))
        if value is not None
    }
    kwargs = dict(call.kwargs)
    if changes:
        again = recondition(request.evolve(**changes))
        if again.pipeline is not call.pipeline:
            raise UnsupportedFeatureError(
                engine.family, f"{HIRES_FEATURE} with a conditioner that replaces the pipeline"
            )
        kwargs = dict(again.kwargs)
    parameters = _call_parameters(img2img)
    for name in ("height", "width", "generator", "output_type"):
        kwargs.pop(name, None)
    if "height" in parameters:
        kwargs.update(height=height, width=width)
    kwargs.update(strength=hires.strength, num_inference_steps=hires.steps or request.num_inference_steps)
    # Keys with a dot are the plugin's own, for its `run`; any other must be an img2img argument.
    unknown = [name for name in kwargs if "." not in name and name not in parameters]
    if unknown:
        raise UnsupportedFeatureError(
            engine.family,
            f"{HIRES_FEATURE} together with {', '.join(unknown)} ({type(img2img).__name__} takes no such argument)",
        )
    generators = [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_images)]
    kwargs["generator"] = generators[0] if len(generators) == 1 else generators
    return kwargs


def second_pass_steps(img2img: Any, steps: int, strength: float, scheduler: Any = None) -> int:
    """How many denoising steps `img2img` reports for `steps` at `strength` with `scheduler` (default its
    own): the timesteps from the strength's start on (the pipeline's own ``get_timesteps``), else the
    usual ``int(steps x strength)``."""
    import copy

    probe = copy.deepcopy(img2img.scheduler if scheduler is None else scheduler)
    try:
        try:
            probe.set_timesteps(steps)
        except ValueError:  # flow-matching schedulers with dynamic shifting need a shift: any gives the count
            probe.set_timesteps(steps, mu=1.0)
        view = copy.copy(img2img)
        object.__setattr__(view, "scheduler", probe)  # past DiffusionPipeline.__setattr__: the view shares a config
        timesteps, _ = view.get_timesteps(steps, strength, "cpu")
        return len(timesteps)
    except Exception:  # noqa: BLE001 - a pipeline without get_timesteps: the count most pipelines run
        return min(int(steps * strength), steps)


def split_progress(
    progress: ProgressCallback | None, second_total: int
) -> tuple[ProgressCallback | None, ProgressCallback | None]:
    """Callbacks for the two passes that report to `progress` as one count: first + second pass steps."""
    if progress is None:
        return None, None
    with_latents = takes_latents(progress)
    first_total = [0]

    def first(step: int, total: int, latents: Any = None) -> None:
        first_total[0] = total
        report_progress(progress, step, total + second_total, latents=latents if with_latents else None)

    def second(step: int, total: int, latents: Any = None) -> None:
        done = first_total[0]
        report_progress(progress, done + step, done + total, latents=latents if with_latents else None)

    return first, second
