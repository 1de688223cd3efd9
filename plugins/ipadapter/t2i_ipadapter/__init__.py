"""t2i conditioner: image prompts (IP-Adapter) from ``GenerationRequest.image_prompts`` on SD1.5, SDXL and FLUX.1.

Each `ImagePrompt` is one IP-Adapter of diffusers' ``load_ip_adapter`` (several make lists, as
diffusers takes them), loaded once per set of shared weights with its CLIP image encoder; the
run calls the family's own pipeline with ``ip_adapter_image``. See ``docs/conditioners/ip-adapter.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import attrs

from t2i_core import Call, Conditioner, IncompatibleAcceleratorsError, hookimpl, loading_lock
from t2i_core.kit import denoiser, is_offloaded

if TYPE_CHECKING:
    from t2i_core import Engine, GenerationRequest, ImagePrompt
    from t2i_core.kit import ImageReader

    from ._sources import DEFAULTS, IncompatibleAdapterError, Source, tiny_adapter_folder
    from ._weights import Installed

__all__ = ["DEFAULTS", "ImagePrompts", "IncompatibleAdapterError", "register_conditioners", "tiny_adapter_folder"]

#: the families whose diffusers pipelines load IP-Adapters (IPAdapterMixin, FluxIPAdapterMixin)
FAMILIES = ("sd15", "sdxl", "flux")


@attrs.define
class _EngineState:
    """What one engine keeps between requests."""

    reader: ImageReader
    #: (model, subfolder, weight_name) as a request gave them → where the adapter is
    sources: dict[tuple[str, str | None, str | None], Source] = attrs.Factory(dict)
    #: (id of the pipeline a call runs, id of the image encoder) → (that pipeline, it with the encoder)
    pipelines: dict[tuple[int, int], tuple[Any, Any]] = attrs.Factory(dict)


class ImagePrompts(Conditioner):
    name = "ip-adapter"
    families = FAMILIES
    feature = "image prompts (IP-Adapter, image_prompts)"
    # After ControlNet (50), whose pipeline then carries the image encoder too.
    order = 60
    description = "image prompts (IP-Adapter) from image_prompts=(ImagePrompt(...), ...), loaded once per weights"

    def wants(self, request: GenerationRequest) -> bool:
        return bool(request.image_prompts)

    def describe_request(self, request: GenerationRequest) -> str:
        from ._sources import describe

        described = []
        for index, prompt in enumerate(request.image_prompts):
            kind = describe(prompt.model)
            described.append(f"image_prompts[{index}].model={prompt.model!r}" + (f" ({kind})" if kind else ""))
        return ", ".join(described)

    def prepare(self, engine: Engine, request: GenerationRequest) -> None:
        from ._sources import check_fits

        _check_placement(engine)
        state = _state(engine)
        state.reader.check([(p.image, f"image_prompts[{i}].image") for i, p in enumerate(request.image_prompts)])
        for index, prompt in enumerate(request.image_prompts):
            field = f"image_prompts[{index}]"
            source = _source(engine, state, prompt, field)
            check_fits(source, denoiser(engine.pipeline), engine.family, f"{field}.model")

    def around_run(self, engine: Engine, request: GenerationRequest) -> AbstractContextManager[Any]:
        # Every request on these families takes a turn, with image prompts or not: another engine
        # over the same UNet must not swap its attention processors while this one runs.
        from ._weights import hold

        state = _state(engine)
        sources = [_source(engine, state, p, f"image_prompts[{i}]") for i, p in enumerate(request.image_prompts)]
        return hold(engine, request, sources)

    def condition(self, engine: Engine, request: GenerationRequest, call: Call) -> None:
        from ._weights import installed

        state = _state(engine)
        prompts = request.image_prompts
        sources = [_source(engine, state, p, f"image_prompts[{i}]") for i, p in enumerate(prompts)]
        call.pipeline = _with_encoder(state, call.pipeline, installed(engine, sources))
        images = [state.reader.rgb(p.image, f"image_prompts[{i}].image") for i, p in enumerate(prompts)]
        # diffusers' form: one image per adapter, a list for several adapters.
        call.kwargs["ip_adapter_image"] = images[0] if len(images) == 1 else images


def _check_placement(engine: Engine) -> None:
    """Refuse an engine whose weights CPU offloading moves: the image encoder would have no device to live on."""
    import torch

    modules = [c for c in engine.pipeline.components.values() if isinstance(c, torch.nn.Module)]
    if any(is_offloaded(module) for module in modules):
        offloading = [name for name in engine.accelerators if "offload" in name] or ["CPU offloading"]
        raise IncompatibleAcceleratorsError(
            offloading, "image prompts need the base model kept on one device; load the engine without offloading"
        )


def _state(engine: Engine) -> _EngineState:
    state = engine.state.get(ImagePrompts.name)
    if state is None:
        from t2i_core.kit import ImageReader

        state = engine.state[ImagePrompts.name] = _EngineState(reader=ImageReader())
    return state


def _source(engine: Engine, state: _EngineState, prompt: ImagePrompt, field: str) -> Source:
    key = (prompt.model, prompt.subfolder, prompt.weight_name)
    source = state.sources.get(key)
    if source is None:
        from ._sources import resolve

        source = state.sources[key] = resolve(prompt, engine.family, field)
    return source


def _with_encoder(state: _EngineState, pipeline: Any, loaded: Installed) -> Any:
    """`pipeline` (the engine's, or another conditioner's) over the same components plus the adapters' image
    encoder and feature extractor, made once per engine."""
    key = (id(pipeline), id(loaded.image_encoder))
    found = state.pipelines.get(key)
    if found is not None and found[0] is pipeline:
        derived = found[1]
    else:
        with loading_lock:
            derived = type(pipeline).from_pipe(
                pipeline,
                image_encoder=loaded.image_encoder,
                feature_extractor=loaded.feature_extractor,
                dtype=denoiser(pipeline).dtype,
            )
        derived.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
        state.pipelines[key] = (pipeline, derived)
    # The engine swaps its scheduler per request; the derived pipeline must run the same one.
    if derived.scheduler is not pipeline.scheduler:
        derived.scheduler = pipeline.scheduler
    return derived


def __getattr__(name: str) -> Any:
    if name in ("DEFAULTS", "IncompatibleAdapterError", "tiny_adapter_folder"):  # public, loaded on first use
        from . import _sources

        return getattr(_sources, name)
    raise AttributeError(f"module 't2i_ipadapter' has no attribute {name!r}")


@hookimpl
def register_conditioners(register: Callable[[Conditioner], None]) -> None:
    register(ImagePrompts())
