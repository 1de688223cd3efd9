"""The checks a request passes before any work: one set, used by the engine and the batch dry run.

`check_request` holds every check that needs no loaded weights (scheduler name, family options,
guidance, step and pixel limits, what the installed conditioners accept), so a batch dry run
accepts exactly what a real run would not refuse before loading. The engine adds the checks that
need its pipeline (the family's `ModelProvider.check_request`, the native size).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from .. import schedulers
from ..errors import InvalidRequestError, UnsupportedFeatureError
from ..provider import ModelProvider
from ..registry import Registry
from ..request import GenerationRequest

#: Largest image `generate()` accepts by default, in pixels (height x width): 2048x2048.
#: ``T2I_MAX_PIXELS`` or `Engine.max_pixels` changes it.
DEFAULT_MAX_PIXELS = 2048 * 2048
MAX_PIXELS_ENV = "T2I_MAX_PIXELS"
#: Largest guidance scale a request may ask for; beyond it every model's output saturates.
MAX_GUIDANCE_SCALE = 100.0
#: Step counts every scheduler runs; beyond it the limit is found by trying the scheduler.
SURE_STEPS = 100
#: How refusals name hires fix.
HIRES_FEATURE = "hires fix (GenerationRequest.hires)"


def default_max_pixels() -> int:
    """``$T2I_MAX_PIXELS``, else `DEFAULT_MAX_PIXELS`."""
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


def check_request(
    registry: Registry,
    provider: ModelProvider,
    request: GenerationRequest,
    *,
    max_pixels: int,
    step_limit: Callable[[str], int] | None,
) -> dict[str, Any]:
    """Refuse what `request` asks that `provider`'s family cannot do, before anything is loaded.

    :param step_limit: the most steps a scheduler name can run (from the checkpoint's scheduler
        config); None when unknown, and then long schedules are left to the run.
    :returns: the family options, typed, with defaults filled in (`ModelProvider.check`).
    """
    schedulers.check(request.scheduler, provider.schedulers, provider.name, provider.named_schedulers)
    options = provider.check(request)
    if request.guidance_scale is not None and request.guidance_scale > MAX_GUIDANCE_SCALE:
        raise InvalidRequestError("guidance_scale", request.guidance_scale, f"a number in [0, {MAX_GUIDANCE_SCALE:g}]")
    scheduler_name = request.scheduler or schedulers.DEFAULT
    # Every scheduler runs short schedules; only long ones are tried against the scheduler.
    steps = request.num_inference_steps
    if steps is not None and steps > SURE_STEPS and step_limit is not None:
        limit = step_limit(scheduler_name)
        if steps > limit:
            allowed = f"an integer in [1, {limit}] (the most steps the {scheduler_name} scheduler can take)"
            raise InvalidRequestError("num_inference_steps", steps, allowed)
    check_conditioners(registry, provider.name, request)
    check_hires_request(registry, provider, request)
    if request.height and request.width:
        check_pixels(request.height, request.width, max_pixels)
    return options


def check_hires_request(registry: Registry, provider: ModelProvider, request: GenerationRequest) -> None:
    """Refuse, before anything loads, a hires request that the family or the request's other fields rule out."""
    if request.hires is None:
        return
    if provider.img2img_class is None:
        supported = sorted(name for name, each in registry.providers.items() if each.img2img_class)
        raise UnsupportedFeatureError(
            provider.name, f"{HIRES_FEATURE}: its plugin names no image-to-image pipeline", supported
        )
    for field, value in (("controls", request.controls), ("image_prompts", request.image_prompts)):
        if value:
            raise UnsupportedFeatureError(provider.name, f"{HIRES_FEATURE} together with {field}")


def check_accelerator_specs(registry: Registry, specs: Iterable[str], device: str) -> None:
    """Refuse, before any work, the accelerators `load` would refuse without loading: unknown names,
    a value on one that takes none or outside its range, one accelerator with two values.

    With `device` ``"auto"`` (each worker picks its own), presets are left out: their stacks depend
    on the device.
    """
    listed = list(specs)
    for spec in listed:
        if not isinstance(spec, str):
            raise InvalidRequestError("accelerators", spec, "accelerator names (str), NAME or NAME@VALUE")
    if device == "auto":
        listed = [spec for spec in listed if spec not in registry.presets]
        device = "cpu"
    registry.resolve_accelerators(listed, device)


def check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise InvalidRequestError(
            "height x width",
            f"{height}x{width}",
            f"at most {max_pixels} pixels per image (Engine.max_pixels / ${MAX_PIXELS_ENV})",
        )


def check_conditioners(registry: Registry, family: str, request: GenerationRequest) -> None:
    """Refuse request fields that no installed conditioner handles, and conditioners that do not
    support `family`, naming both (before any conditioner prepares anything)."""
    conditioners = registry.ordered_conditioners()
    if request.prompt_weighting is not None:
        syntaxes = sorted({c.weighting for c in conditioners if c.weighting})
        if request.prompt_weighting not in syntaxes:
            allowed = (
                "None or one of " + ", ".join(repr(s) for s in syntaxes)
                if syntaxes
                else "None (no installed plugin offers a prompt weighting: see t2i plugins)"
            )
            raise InvalidRequestError("prompt_weighting", request.prompt_weighting, allowed)
    if request.controls and not any(c.wants(request) for c in conditioners):
        raise InvalidRequestError(
            "controls", request.controls, "() (no installed conditioner handles controls: see t2i plugins)"
        )
    for field in ("loras", "embeddings", "image_prompts"):
        value = getattr(request, field)
        if not value:
            continue
        probe = GenerationRequest(prompt=request.prompt, **{field: value})  # nothing else for others to want
        if not any(c.wants(probe) for c in conditioners):
            raise InvalidRequestError(field, value, f"() (no installed conditioner handles {field}: see t2i plugins)")
    for conditioner in conditioners:
        if conditioner.wants(request) and conditioner.families is not None and family not in conditioner.families:
            raise UnsupportedFeatureError(
                family,
                conditioner.feature or conditioner.name,
                conditioner.families,
                requested=conditioner.describe_request(request),
            )


def scheduler_step_limit(
    source: str, is_local: bool, own: schedulers.OwnSchedulers | None = None
) -> Callable[[str], int] | None:
    """The step limit of each scheduler name for a checkpoint, from its scheduler config alone
    (no weights); None when the config cannot be read without loading (a hub checkpoint not cached)."""
    if not is_local:
        return None
    from pathlib import Path

    config_file = Path(source) / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return None
    limits: dict[str, int] = {}

    def limit(name: str) -> int:
        if name not in limits:
            import json

            config = json.loads(config_file.read_text(encoding="utf-8"))
            base = _scheduler_from_config(config)
            scheduler = base if name == schedulers.DEFAULT else schedulers.build(name, base.config, own)
            limits[name] = schedulers.max_steps(scheduler)
        return limits[name]

    return limit


def _scheduler_from_config(config: dict[str, Any]) -> Any:
    from .._locks import loading_lock

    with loading_lock:  # diffusers' lazy attribute lookup is not thread-safe
        import diffusers

        scheduler_class = getattr(diffusers, str(config.get("_class_name")))
    return scheduler_class.from_config(config)
