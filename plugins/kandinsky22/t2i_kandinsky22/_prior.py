"""Pairing a Kandinsky 2.2 decoder with a prior.

A combined checkpoint brings its own prior. A decoder-only checkpoint is paired the way diffusers'
``AutoPipelineForText2Image`` pairs it: with the prior its model card names (the ``prior:`` entry
of ``README.md``), else ``kandinsky-community/kandinsky-2-2-prior``. ``options["prior"]`` names
another prior for a request. Such a prior is loaded on first use, once per loaded decoder, with
the decoder's load arguments and device; each engine gets its own combined pipeline over it,
with its own prior scheduler.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from t2i_core import InvalidRequestError, ModelNotFoundError, UnsupportedFeatureError, loading_lock
from t2i_core.kit import SharedState, is_offloaded
from t2i_core.tiny import TINY_PREFIX, ensure_built

from . import _tiny

COMBINED = "KandinskyV22CombinedPipeline"
DECODER = "KandinskyV22Pipeline"
PRIOR = "KandinskyV22PriorPipeline"
#: the prior of a decoder-only checkpoint whose model card names none
DEFAULT_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
#: short names accepted as ``options["prior"]``
PRIOR_ALIASES = {"kandinsky22-prior": DEFAULT_PRIOR}
#: the ``tiny:`` name accepted as ``options["prior"]``: the prior of ``tiny:kandinsky22``
TINY_PRIOR = f"{TINY_PREFIX}{_tiny.NAME}"
#: ``model_index.json`` classes that hold a prior
PRIOR_CLASSES = (PRIOR, COMBINED)

FIELD = "options['prior']"


@attrs.frozen
class PriorSource:
    """A checked prior: where it is, and whether it is a prior checkpoint or a combined one."""

    #: a local folder or a hub id
    path: str
    class_name: str


@attrs.frozen
class _Origin:
    """How a decoder was loaded: the prior is loaded the same way."""

    load_kwargs: Mapping[str, Any]
    #: the prior of a decoder-only checkpoint; None for a combined one, which has its own
    default_prior: str | None


class Priors:
    """Resolves prior names, loads priors, and pairs them with engines' decoders."""

    def __init__(self, family: str) -> None:
        self._family = family
        self._lock = threading.Lock()
        self._sources: dict[tuple[str, bool], PriorSource] = {}
        # Per loaded decoder, keyed by its UNet, which no value holds: entries go with the weights.
        self._origins: weakref.WeakKeyDictionary[Any, _Origin] = weakref.WeakKeyDictionary()
        self._loaded: SharedState[dict[str, Any]] = SharedState(lambda _pipeline: {})
        # Per engine (an engine's pipeline object is its own); the values do not hold the key.
        self._engines: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()

    def remember(self, pipeline: Any, load_kwargs: Mapping[str, Any], default_prior: str | None = None) -> None:
        """Note how `pipeline` was loaded and which prior a decoder-only checkpoint is paired with."""
        self._origins[pipeline.unet] = _Origin(load_kwargs=dict(load_kwargs), default_prior=default_prior)

    def resolve(self, value: str, *, default: bool = False) -> PriorSource:
        """Check a prior name (``tiny:kandinsky22``, an alias, a folder or a hub id); reads only ``model_index.json``.

        `default` says that the name is a decoder's default prior rather than ``options["prior"]``.
        """
        with self._lock:
            known = self._sources.get((value, default))
        if known is None:
            known = self._resolve(value, default)
            with self._lock:
                self._sources[(value, default)] = known
        return known

    def _resolve(self, value: str, default: bool) -> PriorSource:
        try:
            return _check(value)
        except InvalidRequestError as exc:
            if not default:
                raise
            reason = f"this decoder's model card names it as its prior, but it is not {exc.allowed}"
            raise ModelNotFoundError(value, f"{reason}; name a prior with {FIELD}") from None
        except ModelNotFoundError as exc:
            if default:
                reason = f"it is the prior that this decoder-only checkpoint is paired with, but {exc.reason}"
                raise ModelNotFoundError(exc.model, f"{reason}; name a prior you have with {FIELD}") from None
            raise ModelNotFoundError(exc.model, f"{FIELD} names it, but {exc.reason}") from None

    def pipeline_for(self, pipeline: Any, decoder: Any, prior: PriorSource | None) -> Any:
        """The combined pipeline that runs a request on an engine's `pipeline` with `prior` (None = its own).

        `decoder` is the engine's decoder pipeline: its scheduler (the request's choice) is used.
        """
        if prior is None:
            if hasattr(pipeline, "prior_pipe"):
                return pipeline
            origin = self._origins.get(pipeline.unet)
            named = origin.default_prior if origin is not None else None
            prior = self.resolve(named or DEFAULT_PRIOR, default=True)
        mine = self._engines.setdefault(pipeline, {})
        paired = mine.get(prior.path)
        if paired is None:
            paired = mine[prior.path] = self._pair(pipeline, decoder, prior)
        if paired.decoder_pipe.scheduler is not decoder.scheduler:
            paired.decoder_pipe.scheduler = decoder.scheduler
        return paired

    def _pair(self, pipeline: Any, decoder: Any, prior: PriorSource) -> Any:
        with loading_lock:
            from diffusers import KandinskyV22CombinedPipeline

        if _offloaded(decoder):
            raise UnsupportedFeatureError(
                self._family,
                "CPU offloading (cpu_offload, sequential_offload) with a prior loaded apart from the decoder "
                "(a decoder-only checkpoint, or options['prior']); a combined checkpoint supports it",
            )
        with self._lock:
            loaded = self._loaded.get(pipeline)
            if prior.path not in loaded:
                loaded[prior.path] = self._load(pipeline, prior)
            shared = loaded[prior.path]
        paired = KandinskyV22CombinedPipeline(
            unet=decoder.unet,
            scheduler=decoder.scheduler,
            movq=decoder.movq,
            prior_prior=shared.prior,
            prior_image_encoder=shared.image_encoder,
            prior_text_encoder=shared.text_encoder,
            prior_tokenizer=shared.tokenizer,
            prior_scheduler=copy.deepcopy(shared.scheduler),
            prior_image_processor=shared.image_processor,
        )
        paired.set_progress_bar_config(disable=True)
        return paired

    def _load(self, pipeline: Any, prior: PriorSource) -> Any:
        """The prior pipeline at `prior`, loaded like the decoder of `pipeline` and placed on its device."""
        kwargs = self._load_kwargs(pipeline, prior)
        try:
            with loading_lock:
                from diffusers import KandinskyV22CombinedPipeline, KandinskyV22PriorPipeline

                if prior.class_name == PRIOR:
                    loaded = KandinskyV22PriorPipeline.from_pretrained(prior.path, **kwargs)
                else:
                    # The decoder's own UNet and MoVQ stand in for the checkpoint's: only its prior is read.
                    combined = KandinskyV22CombinedPipeline.from_pretrained(
                        prior.path, unet=pipeline.unet, movq=pipeline.movq, **kwargs
                    )
                    loaded = combined.prior_pipe
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise ModelNotFoundError(
                prior.path, f"diffusers could not load it as a Kandinsky 2.2 prior ({type(exc).__name__}: {reason})"
            ) from exc
        return loaded.to(pipeline.device)

    def _load_kwargs(self, pipeline: Any, prior: PriorSource) -> dict[str, Any]:
        from t2i_core.kit import has_variant

        origin = self._origins.get(pipeline.unet)
        kwargs: dict[str, Any] = dict(origin.load_kwargs) if origin is not None else {"use_safetensors": True}
        kwargs.setdefault("torch_dtype", pipeline.unet.dtype)
        variant = kwargs.pop("variant", None)
        if variant is not None and has_variant(prior.path, variant):
            kwargs["variant"] = variant
        return kwargs


def _check(value: str) -> PriorSource:
    from t2i_core.kit import is_hub_id, read_model_index

    if value.startswith(TINY_PREFIX):
        if value != TINY_PRIOR:
            raise InvalidRequestError(FIELD, value, _allowed())
        return PriorSource(path=str(ensure_built(_tiny.NAME, _tiny.VERSION, _tiny.build)), class_name=COMBINED)
    source = PRIOR_ALIASES.get(value, value)
    path = Path(source).expanduser()
    if not path.is_dir() and (path.exists() or not is_hub_id(source, namespaced=True)):
        raise InvalidRequestError(FIELD, value, f"{_allowed()} (there is no folder {path})")
    is_local = path.is_dir()
    index = read_model_index(source, str(path) if is_local else source, is_local=is_local)
    class_name = index.get("_class_name")
    if class_name not in PRIOR_CLASSES:
        raise InvalidRequestError(
            FIELD, value, f"a Kandinsky 2.2 prior ({' or '.join(PRIOR_CLASSES)}), not {class_name!r}"
        )
    return PriorSource(path=str(path) if is_local else source, class_name=str(class_name))


def model_card_prior(source: str) -> str | None:
    """The prior that a decoder's model card names (``prior:`` in ``README.md``), as diffusers reads it."""
    from huggingface_hub import ModelCard

    path = Path(source) / "README.md"
    try:
        if not Path(source).is_dir():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "README.md"))
        if not path.is_file():
            return None
        named = getattr(ModelCard.load(path).data, "prior", None)
    except Exception:  # noqa: BLE001 - no readable card means no named prior: the default applies
        return None
    if isinstance(named, list):
        named = named[0] if named else None
    return named if isinstance(named, str) and named.strip() else None


def _offloaded(decoder: Any) -> bool:
    # Offloading hooks move the decoder's models on and off the GPU around its calls; a prior
    # placed beside them with .to() would meet its inputs on the wrong device.
    return any(is_offloaded(model) for model in (decoder.unet, decoder.movq))


def _allowed() -> str:
    named = ", ".join(repr(name) for name in (TINY_PRIOR, *PRIOR_ALIASES))
    return f"{named}, a local Kandinsky 2.2 prior (or combined) folder, or a hub id"
