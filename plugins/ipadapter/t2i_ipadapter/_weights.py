"""IP-Adapters inside an engine's shared denoiser (imports torch and diffusers).

diffusers' ``load_ip_adapter`` replaces the denoiser's attention processors (the UNet's, or
FLUX.1's transformer's) by IP-Adapter ones and gives it an image projection (``encoder_hid_proj``);
with those in place it wants image embeddings on every call. Here "the UNet" stands for either.
Engines from one cached `load()` share it, so one
`SharedWeights` per set of weights records each set of adapters a request asked for, loaded
once (its processors, projection, image encoder and feature extractor), and the UNet's own
processors from before. A request's run holds a turn (`t2i_core.kit.Turns`) during which the
UNet holds exactly its adapters at its scales — or, for a request without image prompts, its
own processor objects again, so that it gives the plain image bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import attrs

from t2i_core import ModelNotFoundError, loading_lock
from t2i_core.kit import SharedState, Turns, denoiser

if TYPE_CHECKING:
    from t2i_core import Engine, GenerationRequest

    from ._sources import Source

#: the adapters of a request, by `Source.key`, in order
AdapterKey = tuple[tuple[str, str, str], ...]
#: what the UNet computes: the adapters and their scales; () = the UNet's own processors
Active = tuple[AdapterKey, tuple[float, ...]] | tuple[()]


@attrs.frozen(eq=False)
class Installed:
    """What goes into the UNet (and beside it) for one set of adapters, or the UNet's own state."""

    processors: dict[str, Any]
    projection: Any
    hid_type: str | None
    image_encoder: Any = None
    feature_extractor: Any = None


@attrs.define(eq=False)
class SharedWeights:
    """The adapters loaded into one set of shared weights, and the turns of the runs that use them."""

    turns: Turns = attrs.Factory(Turns)
    #: each set of adapters asked for, loaded once
    sets: dict[AdapterKey, Installed] = attrs.Factory(dict)
    #: the UNet's own processors and projection, taken when it last left them for adapters
    own: Installed | None = None
    #: what the UNet computes now; None = unknown (a change failed half-way)
    active: Active | None = ()
    #: (location, subfolder) of an adapter → the image encoder and feature extractor loaded with it
    encoders: dict[tuple[str, str], tuple[Any, Any]] = attrs.Factory(dict)
    #: how many times ``load_ip_adapter`` ran on these weights
    loads: int = 0


_SHARED: SharedState[SharedWeights] = SharedState(lambda _pipeline: SharedWeights())


def shared_weights(engine: Engine) -> SharedWeights:
    """The adapters of `engine`'s weights, shared by every engine over them (made on first use)."""
    return _SHARED.get(engine.pipeline)


def hold(engine: Engine, request: GenerationRequest, sources: Sequence[Source]) -> AbstractContextManager[None]:
    """A turn during which `engine`'s UNet computes `request`'s image prompts (its own processors when none)."""
    shared = shared_weights(engine)
    wanted: Active = ()
    if sources:
        wanted = (tuple(s.key for s in sources), tuple(p.scale for p in request.image_prompts))
    return shared.turns.hold(lambda: shared.active == wanted, lambda: _change(engine, shared, sources, wanted))


def installed(engine: Engine, sources: Sequence[Source]) -> Installed:
    """The loaded set of `sources` (call while holding their turn)."""
    return shared_weights(engine).sets[tuple(s.key for s in sources)]


def _change(engine: Engine, shared: SharedWeights, sources: Sequence[Source], wanted: Active) -> None:
    """Make the UNet compute `wanted` (no run holds a turn meanwhile)."""
    unet = denoiser(engine.pipeline)
    previous, shared.active = shared.active, None
    if not wanted:
        if shared.own is not None:
            _install(unet, shared.own)
        shared.active = ()
        return
    keys, scales = wanted
    if previous == ():
        shared.own = _take(unet)
    loaded = shared.sets.get(keys)
    if loaded is None:
        try:
            loaded = shared.sets[keys] = _load(engine, shared, sources)
        except BaseException:
            if shared.own is not None:
                _install(unet, shared.own)
                shared.active = ()
            raise
    else:
        _install(unet, loaded)
    # One adapter takes a number (a list would be FLUX.1's per-layer scales), several a list.
    engine.pipeline.set_ip_adapter_scale(scales[0] if len(scales) == 1 else list(scales))
    shared.active = wanted


def _take(unet: Any, image_encoder: Any = None, feature_extractor: Any = None) -> Installed:
    return Installed(
        processors=dict(unet.attn_processors),
        projection=getattr(unet, "encoder_hid_proj", None),
        hid_type=getattr(unet.config, "encoder_hid_dim_type", None),
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
    )


def _install(unet: Any, state: Installed) -> None:
    unet.set_attn_processor(dict(state.processors))  # set_attn_processor empties the dict it is given
    unet.encoder_hid_proj = state.projection
    # As diffusers' load_ip_adapter and unload_ip_adapter do: the UNet reads the attribute.
    unet.config.encoder_hid_dim_type = state.hid_type


def _load(engine: Engine, shared: SharedWeights, sources: Sequence[Source]) -> Installed:
    """diffusers' ``load_ip_adapter`` for `sources`, on a pipeline over the engine's components; the
    UNet keeps what it installed. The image encoder comes from the first adapter, as in diffusers."""
    base = engine.pipeline
    dtype = denoiser(base).dtype
    first = (sources[0].location, sources[0].subfolder)
    encoder, extractor = shared.encoders.get(first, (None, None))
    try:
        with loading_lock:
            extra = {"image_encoder": encoder, "feature_extractor": extractor} if encoder is not None else {}
            # from_pipe casts every component to its dtype (float32 when not given): the
            # UNet's own dtype keeps the shared weights as they are.
            helper = type(base).from_pipe(base, dtype=dtype, **extra)
            helper.load_ip_adapter(
                [s.location for s in sources],
                subfolder=[s.subfolder for s in sources],
                weight_name=[s.weight_name for s in sources],
                **_encoder_kwargs(sources[0], dtype),
            )
    except Exception as exc:
        text = str(exc)
        reason = text.splitlines()[0] if text else type(exc).__name__
        models = ", ".join(dict.fromkeys(s.model for s in sources))
        raise ModelNotFoundError(models, f"diffusers could not load it as an IP-Adapter ({reason})") from exc
    shared.loads += 1
    shared.encoders.setdefault(first, (helper.image_encoder, helper.feature_extractor))
    return _take(denoiser(base), helper.image_encoder, helper.feature_extractor)


def _encoder_kwargs(source: Source, dtype: Any) -> dict[str, Any]:
    """FLUX.1's loader takes its image encoder from a repository of its own, in float16 unless told:
    t2i gives it the transformer's dtype, as SD 1.5 and SDXL load theirs."""
    if source.image_encoder is None:
        return {}
    return {
        "image_encoder_pretrained_model_name_or_path": source.image_encoder,
        "image_encoder_subfolder": "",
        "image_encoder_dtype": dtype,
    }
