"""t2i conditioner: ControlNet guidance from ``GenerationRequest.controls`` on SD1.5 and SDXL.

One control runs diffusers' ControlNet pipeline for the family; two or more run its
multi-ControlNet. The ControlNet pipelines are built with ``from_pipe`` over the engine's own
components, so switching between controlled and plain requests reloads nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from t2i_core import (
    Call,
    Conditioner,
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    ModelNotFoundError,
    hookimpl,
    loading_lock,
)
from t2i_core.kit import SharedState, is_offloaded

if TYPE_CHECKING:
    from t2i_core import Control, Engine, GenerationRequest
    from t2i_core.kit import ImageReader

    from ._sources import IncompatibleControlNetError, Source, tiny_controlnet_folder

__all__ = ["ControlNet", "IncompatibleControlNetError", "register_conditioners", "tiny_controlnet_folder"]

#: the diffusers ControlNet pipeline of each family, built over the family's text-to-image pipeline
PIPELINES = {"sd15": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline"}


@attrs.define
class _EngineState:
    """What one engine keeps between requests: ControlNets and their pipelines are made once."""

    reader: ImageReader
    #: ``Control.model`` → where it is and its config
    sources: dict[str, Source] = attrs.Factory(dict)
    #: `Source.location` → the loaded ``ControlNetModel``
    models: dict[str, Any] = attrs.Factory(dict)
    #: the locations of a request's ControlNets, in order → the ControlNet pipeline over the engine's components
    pipelines: dict[tuple[str, ...], Any] = attrs.Factory(dict)


class ControlNet(Conditioner):
    name = "controlnet"
    families = tuple(PIPELINES)
    feature = "ControlNet conditioning (controls)"
    # Before prompt conditioners, so that they see the pipeline that will run.
    order = 50
    description = "ControlNet guidance from controls=(Control(...), ...); two or more use multi-ControlNet"

    def wants(self, request: GenerationRequest) -> bool:
        return bool(request.controls)

    def describe_request(self, request: GenerationRequest) -> str:
        from ._sources import describe

        described = []
        for index, control in enumerate(request.controls):
            kind = describe(control.model)
            described.append(f"controls[{index}].model={control.model!r}" + (f" ({kind})" if kind else ""))
        return ", ".join(described)

    def prepare(self, engine: Engine, request: GenerationRequest) -> None:
        # The image reader and the ControlNet sources load with the first control, not at registration.
        from ._images import parse_preprocess
        from ._sources import check_fits

        _check_placement(engine)
        state = _state(engine)
        controls = request.controls
        for index, control in enumerate(controls):
            parse_preprocess(control.preprocess, f"controls[{index}].preprocess")
            if control.guess_mode != controls[0].guess_mode:
                raise InvalidRequestError(
                    f"controls[{index}].guess_mode",
                    control.guess_mode,
                    f"{controls[0].guess_mode} as in controls[0]: guess mode applies to the whole call",
                )
        state.reader.check([(control.image, f"controls[{index}].image") for index, control in enumerate(controls)])
        base = engine.pipeline.unet.config
        for index, control in enumerate(controls):
            field = f"controls[{index}].model"
            check_fits(_source(state, control.model, field), base, engine.family, field)

    def condition(self, engine: Engine, request: GenerationRequest, call: Call) -> None:
        assert request.width is not None and request.height is not None  # resolved by the engine
        from ._images import parse_preprocess, sized

        state = _state(engine)
        controls = request.controls
        sources = [_source(state, c.model, f"controls[{i}].model") for i, c in enumerate(controls)]
        pipeline = _pipeline(engine, state, sources)
        # The engine swaps its scheduler per request; the ControlNet pipeline must run the same one.
        if pipeline.scheduler is not engine.pipeline.scheduler:
            pipeline.scheduler = engine.pipeline.scheduler
        images = [
            sized(
                state.reader.rgb(control.image, f"controls[{index}].image"),
                request.width,
                request.height,
                parse_preprocess(control.preprocess, f"controls[{index}].preprocess"),
            )
            for index, control in enumerate(controls)
        ]
        call.pipeline = pipeline
        call.kwargs.update(_control_kwargs(controls, images))


def _check_placement(engine: Engine) -> None:
    """Refuse an engine whose weights CPU offloading moves: its ControlNet would have no device to live on."""
    import torch

    modules = [c for c in engine.pipeline.components.values() if isinstance(c, torch.nn.Module)]
    if any(is_offloaded(module) for module in modules):
        offloading = [name for name in engine.accelerators if "offload" in name] or ["CPU offloading"]
        raise IncompatibleAcceleratorsError(
            offloading, "ControlNet controls need the base model kept on one device; load the engine without offloading"
        )


def _control_kwargs(controls: Sequence[Control], images: list[Any]) -> dict[str, Any]:
    """diffusers' arguments: plain values for one ControlNet, lists (one per control) for several."""
    kwargs: dict[str, Any] = {"guess_mode": controls[0].guess_mode}
    if len(controls) == 1:
        (control,) = controls
        kwargs.update(
            image=images[0],
            controlnet_conditioning_scale=control.scale,
            control_guidance_start=control.start,
            control_guidance_end=control.end,
        )
    else:
        kwargs.update(
            image=images,
            controlnet_conditioning_scale=[c.scale for c in controls],
            control_guidance_start=[c.start for c in controls],
            control_guidance_end=[c.end for c in controls],
        )
    return kwargs


def _state(engine: Engine) -> _EngineState:
    state = engine.state.get(ControlNet.name)
    if state is None:
        from t2i_core.kit import ImageReader

        state = engine.state[ControlNet.name] = _EngineState(reader=ImageReader())
    return state


def _source(state: _EngineState, model: str, field: str) -> Source:
    source = state.sources.get(model)
    if source is None:
        from ._sources import resolve

        source = state.sources[model] = resolve(model, field)
    return source


def _pipeline(engine: Engine, state: _EngineState, sources: list[Source]) -> Any:
    key = tuple(source.location for source in sources)
    pipeline = state.pipelines.get(key)
    if pipeline is not None:
        return pipeline
    base = engine.pipeline
    models = [_model(state, source, base) for source in sources]
    with loading_lock:
        import diffusers

        pipeline_class = getattr(diffusers, PIPELINES[engine.family])
        # from_pipe casts every component to its torch_dtype (float32 when not given): the base's own
        # dtype keeps the shared weights as they are.
        pipeline = pipeline_class.from_pipe(
            base, controlnet=models[0] if len(models) == 1 else models, torch_dtype=base.unet.dtype
        )
    pipeline.set_progress_bar_config(**getattr(base, "_progress_bar_config", {}))
    state.pipelines[key] = pipeline
    return pipeline


#: per set of base weights: `Source.location` → loaded ControlNet. Engines over the same cached base
#: weights share their ControlNets' weights too; they go when the base weights go.
_LOADED: SharedState[dict[str, Any]] = SharedState(lambda _pipeline: {})
_LOADING = threading.Lock()


def _model(state: _EngineState, source: Source, base: Any) -> Any:
    model = state.models.get(source.location)
    if model is None:
        with _LOADING:
            loaded = _LOADED.get(base)
            model = loaded.get(source.location)
            if model is None:
                model = loaded[source.location] = _load_model(source, base.unet)
        state.models[source.location] = model
    return model


def _load_model(source: Source, unet: Any) -> Any:
    try:
        with loading_lock:
            from diffusers import ControlNetModel

            model = ControlNetModel.from_pretrained(source.location, torch_dtype=unet.dtype, use_safetensors=True)
    except Exception as exc:
        text = str(exc)
        reason = text.splitlines()[0] if text else type(exc).__name__
        if "safetensors" in text.lower():
            reason = "it has no safetensors weights (t2i loads ControlNets from safetensors only)"
        raise ModelNotFoundError(source.model, f"diffusers could not load it as a ControlNet ({reason})") from exc
    return model.to(unet.device)


def __getattr__(name: str) -> Any:
    if name in ("IncompatibleControlNetError", "tiny_controlnet_folder"):  # public, loaded on first use
        from . import _sources

        return getattr(_sources, name)
    raise AttributeError(f"module 't2i_controlnet' has no attribute {name!r}")


@hookimpl
def register_conditioners(register: Callable[[Conditioner], None]) -> None:
    register(ControlNet())
