"""The model-provider role: what a model-family plugin implements.

A provider recognises its checkpoints, loads them as a diffusers pipeline, fills in the
family's defaults, and runs the pipeline with the call arguments the conditioners built.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from ._hub import read_model_index
from ._locks import loading_lock
from ._modules import private_components as _private_components
from ._progress import progress_kwargs as _progress_kwargs
from .errors import InvalidRequestError, ModelNotFoundError, UnsupportedFeatureError

if TYPE_CHECKING:
    from PIL.Image import Image

    from ._progress import ProgressCallback
    from .request import GenerationRequest


_TYPE_NAMES = {int: "integer", float: "number", str: "text", bool: "boolean"}


@attrs.frozen(kw_only=True)
class FamilyDefaults:
    """A family's defaults; ``None`` size means the checkpoint's native size."""

    height: int | None = None
    """Height when a request gives none; None: the checkpoint's native size (its ``sample_size`` times the
    VAE scale).
    """
    width: int | None = None
    """Width when a request gives none; None: the checkpoint's native size."""
    num_inference_steps: int = 50
    """Steps when a request gives none; default 50."""
    guidance_scale: float = 7.5
    """Guidance scale when a request gives none; default 7.5."""


@attrs.frozen(kw_only=True)
class Option:
    """A family option: a named, typed, bounded knob passed as ``GenerationRequest.options``."""

    name: str
    """The option's name, as in ``GenerationRequest.options`` and ``--option NAME=VALUE``."""
    type: type
    """The Python type of each value: ``int``, ``float``, ``str`` or ``bool`` (text from the command line
    is converted).
    """
    default: Any
    """The value when the request does not set the option (None: the pipeline's own default)."""
    help: str
    """One line saying what it does, for ``t2i options``, the docs and errors."""
    minimum: float | None = None
    """Inclusive lower bound of a number; None: unbounded."""
    maximum: float | None = None
    """Inclusive upper bound of a number; None: unbounded."""
    choices: tuple[Any, ...] | None = None
    """The values allowed, when it is one of a few; None: any value of `type` in bounds."""
    length: int = 1
    """How many values (e.g. 2 for a (height, width) pair); 1 = a single value."""

    def describe(self) -> str:
        """What values are allowed, in words."""
        kind = _TYPE_NAMES.get(self.type, self.type.__name__)
        if self.choices is not None:
            allowed = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.minimum is not None and self.maximum is not None:
            allowed = f"{kind} in [{self.minimum}, {self.maximum}]"
        elif self.minimum is not None:
            allowed = f"{kind} >= {self.minimum}"
        elif self.maximum is not None:
            allowed = f"{kind} <= {self.maximum}"
        else:
            allowed = kind
        if self.length > 1:
            allowed = f"{self.length} comma-separated values, each {allowed}"
        return allowed

    def coerce(self, value: Any) -> Any:
        """Check `value` (a Python value, or the text given on the command line) and return it typed."""
        field = f"options[{self.name!r}]"
        if value is None and self.default is None:
            return None
        if self.length > 1:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or len(items) != self.length:
                raise InvalidRequestError(field, value, self.describe())
            return tuple(self._coerce_one(field, item, value) for item in items)
        return self._coerce_one(field, value, value)

    def _coerce_one(self, field: str, item: Any, whole: Any) -> Any:
        if isinstance(item, str) and self.type is not str:
            text = item.strip()
            try:
                if self.type is bool:
                    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(text)
                    item = text.lower() in ("true", "1", "yes")
                else:
                    item = self.type(text)
            except ValueError:
                raise InvalidRequestError(field, whole, self.describe()) from None
        if self.type is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        if not isinstance(item, self.type) or (isinstance(item, bool) and self.type is not bool):
            raise InvalidRequestError(field, whole, self.describe())
        if self.choices is not None and item not in self.choices:
            raise InvalidRequestError(field, whole, self.describe())
        number: Any = item
        if isinstance(number, float) and not math.isfinite(number):
            raise InvalidRequestError(field, whole, self.describe())
        if (self.minimum is not None and number < self.minimum) or (self.maximum is not None and number > self.maximum):
            raise InvalidRequestError(field, whole, self.describe())
        return item


class ModelProvider:
    """Base class of a model family. Subclass it, set the class attributes, implement `build_tiny`.

    The defaults below fit any diffusers text-to-image pipeline loaded through
    ``AutoPipelineForText2Image``; override what your family does differently.
    """

    name: ClassVar[str]
    """The family name (``family=`` / ``--family``)."""
    aliases: ClassVar[Mapping[str, str]] = {}
    """Short names users may pass as ``model`` → the hub id they stand for."""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    """``_class_name`` values of ``model_index.json`` that this family recognises."""
    defaults: ClassVar[FamilyDefaults] = FamilyDefaults()
    """The family's defaults for size, steps and guidance (`FamilyDefaults`)."""
    options: ClassVar[tuple[Option, ...]] = ()
    """The family options a request may set (`Option`s); any other name is refused."""
    description: ClassVar[str] = ""
    """One line for ``t2i plugins``."""
    tiny_version: ClassVar[int] = 1
    """Bump when the tiny checkpoint's recipe changes, so caches are rebuilt."""
    schedulers: ClassVar[tuple[str, ...] | None] = None
    """The named schedulers (t2i_core.schedulers) the family's pipeline can run; None = all of them."""
    named_schedulers: ClassVar[Mapping[str, tuple[str, Mapping[str, Any]]]] = {}
    """The family's own named schedulers: name → (diffusers scheduler class name, config overrides), built
    from the checkpoint's scheduler config like the shared ones. Requests for this family may name them
    whatever `schedulers` says (a flow-matching family sets ``schedulers = ()``, since none of the
    shared ones fit, and offers its samplers here); an own name shadows a shared one.
    """
    skipped_components: ClassVar[tuple[str, ...]] = ()
    """Components that `load_pipeline` never loads (it passes ``None`` for them): a local checkpoint may
    lack their folders although ``model_index.json`` lists them (e.g. ``("text_encoder_3",
    "tokenizer_3")``).
    """
    cuda_graph_regions: ClassVar[bool] = False
    """True: ``compile-regional`` on CUDA captures the denoiser's compiled blocks in CUDA graphs. Set it
    when that was measured faster for the family (SD 1.5: 0.56 s/image against 0.80 s without, on an
    H200); the default keeps plain compiled kernels, which are never slower.
    """
    loads_gguf: ClassVar[bool] = False
    """True: `load_single_file` also takes ``.gguf`` files, whose denoiser is quantized already (diffusers'
    GGUF loader; `t2i_core.kit.load_single_file_component` loads one). A ``.gguf`` file that a family
    without it claims is refused before anything loads.
    """
    img2img_class: ClassVar[str | None] = None
    """The diffusers image-to-image pipeline class, by name (``"StableDiffusionImg2ImgPipeline"``), that
    the second pass of hires fix (`t2i_core.HiresFix`) runs, built over the loaded components by
    `img2img_pipeline`; None: the family refuses hires requests before any work.
    """

    # -- discovery -------------------------------------------------------------------------
    def detect(self, model_index: Mapping[str, Any]) -> bool:
        """Whether a checkpoint whose ``model_index.json`` is `model_index` belongs to this family."""
        return model_index.get("_class_name") in self.pipeline_classes

    def detect_single_file(self, keys: Collection[str]) -> bool:
        """Whether a single-file checkpoint whose tensor names are `keys` belongs to this family.

        Called by `load` for a ``.safetensors`` or ``.gguf`` (or, with ``allow_pickle``, ``.ckpt``)
        file, with the names from the file's header (no weights are read). The default claims none: a family
        that loads single files overrides it and `load_single_file`.
        """
        return False

    def build_tiny(self, folder: Path) -> None:
        """Write a small random-weight checkpoint of this family into `folder` (a diffusers folder).

        Called once per cache; must be deterministic and must not touch the network.
        """
        raise NotImplementedError(f"family {self.name!r} offers no tiny checkpoint")

    def architecture_folder(self) -> Path | None:
        """The full-size architecture as config files only, no weights, shipped in the plugin's
        ``architecture/`` folder; None if absent.

        New plugins lay it out as diffusers does a checkpoint, minus the weights: ``model_index.json``
        and one folder per component with the file diffusers or transformers reads
        (``transformer/config.json``, ``scheduler/scheduler_config.json``, ...) — what
        ``from_pretrained`` and ``from_single_file(config=...)`` read. Benchmarks build
        random-weight full-size pipelines from it: speed does not depend on weights.
        """
        import sys

        module = sys.modules.get(type(self).__module__)
        if module is None or getattr(module, "__file__", None) is None:
            return None
        folder = Path(str(module.__file__)).resolve().parent / "architecture"
        return folder if (folder / "model_index.json").is_file() else None

    # -- loading ---------------------------------------------------------------------------
    def load_pipeline(self, source: str, load_kwargs: Mapping[str, Any], model_index: Mapping[str, Any] | None) -> Any:
        """Load the pipeline from `source` (hub id or local folder) with diffusers' `from_pretrained` kwargs.

        The engine calls this, with the checkpoint's ``model_index.json`` as it already read it
        (None when the checkpoint has none). Override it to decide from `model_index` before any
        weights load: pass ``None`` for an optional component (``text_encoder_3=None``), or refuse a
        checkpoint of another family. The default calls `load` (the t2i 0.1 method), so providers
        that override `load` keep working unchanged.
        """
        return self.load(source, load_kwargs)

    def load(self, source: str, load_kwargs: Mapping[str, Any]) -> Any:
        """Load the pipeline from `source` (hub id or local folder) with diffusers' `from_pretrained` kwargs.

        The t2i 0.1 loading method: override `load_pipeline` in new providers. Called directly on a
        provider that overrides `load_pipeline` (by code written for 0.1), it reads
        ``model_index.json`` and calls that; called from `load_pipeline` (``super().load(...)``),
        it loads with diffusers.
        """
        if type(self).load_pipeline is not ModelProvider.load_pipeline and not getattr(_loading, "active", False):
            return load_pipeline_of(self, source, load_kwargs, _model_index(source))
        from diffusers import AutoPipelineForText2Image

        return AutoPipelineForText2Image.from_pretrained(source, **load_kwargs)

    def load_single_file(self, file: str, config: str, load_kwargs: Mapping[str, Any]) -> Any:
        """Load the single-file checkpoint `file` with the configs and tokenizers of the local folder `config`.

        The default calls diffusers' ``<first of pipeline_classes>.from_single_file(file,
        config=config, local_files_only=True)`` with the dtype the accelerators chose, so
        nothing is ever downloaded; the engine holds `loading_lock` around it. A
        ``quantization_config`` in `load_kwargs` that covers the denoiser quantizes it: the
        denoiser is loaded first (`t2i_core.kit.load_single_file_component`) and handed to the
        pipeline, since the pipeline's ``from_single_file`` quantizes nothing.
        """
        import diffusers

        from ._single_file_components import quantized_denoiser

        if not self.pipeline_classes:
            raise NotImplementedError(f"family {self.name!r} names no pipeline class to load single files with")
        import torch

        pipeline_class = getattr(diffusers, self.pipeline_classes[0])
        dtype = load_kwargs.get("torch_dtype")
        # float32 is what from_single_file loads anyway; passing it only makes diffusers warn.
        kwargs = {} if dtype in (None, torch.float32) else {"torch_dtype": dtype}
        kwargs.update(quantized_denoiser(self.name, file, config, load_kwargs))
        return pipeline_class.from_single_file(file, config=config, local_files_only=True, **kwargs)

    def check_pipeline(self, model: str, pipeline: Any) -> None:
        """Refuse a loaded pipeline this family cannot run (e.g. ``family="sdxl"`` forced onto SD 1.5).

        The default accepts instances of `pipeline_classes` (or of their subclasses).
        """
        names = {cls.__name__ for cls in type(pipeline).__mro__}
        if self.pipeline_classes and not names.intersection(self.pipeline_classes):
            raise ModelNotFoundError(
                model,
                f"it loads as a {type(pipeline).__name__}, which family {self.name!r} cannot run "
                f"(expected {' or '.join(self.pipeline_classes)}); check --family / family=",
            )

    def share(self, pipeline: Any) -> Any:
        """A new pipeline object over the same weights, for the engine cache.

        Models (torch modules) are shared; everything with per-call state — the scheduler,
        tokenizers (whose padding settings change on every call), image processors — is the
        engine's own copy, so engines in different threads never interfere.
        """
        import copy

        shared = copy.copy(pipeline)
        for name, component in _private_components(pipeline).items():
            setattr(shared, name, component)
        return shared

    def native_size(self, pipeline: Any) -> tuple[int, int]:
        """The (height, width) the checkpoint was made for.

        The default reads the denoiser's ``sample_size`` (its latent size: a UNet's, or a
        transformer's such as ``SD3Transformer2DModel``) and multiplies it by the pipeline's
        ``vae_scale_factor``, as diffusers' own pipelines do. Override it when the family's
        pipeline computes its default size another way.
        """
        denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
        if sample is None:
            raise NotImplementedError(
                f"family {getattr(self, 'name', type(self).__name__)!r}: {type(pipeline).__name__} has no unet or "
                "transformer with a sample_size; "
                "override ModelProvider.native_size"
            )
        height, width = (sample, sample) if isinstance(sample, int) else sample
        factor = int(getattr(pipeline, "vae_scale_factor", None) or 8)
        return int(height) * factor, int(width) * factor

    def pipeline_defaults(self, pipeline: Any) -> FamilyDefaults:
        """The defaults for requests on this loaded `pipeline`: the class's `defaults` unless the
        checkpoint calls for others (a FLUX.1 schnell-style transformer runs 4 steps without guidance).

        `Engine.resolve` asks this once per request; the default returns `defaults`.
        """
        return self.defaults

    def scheduler_owner(self, pipeline: Any) -> Any:
        """The (sub-)pipeline whose ``scheduler`` a request's scheduler choice replaces."""
        return pipeline

    def img2img_pipeline(self, pipeline: Any) -> Any:
        """The image-to-image pipeline over `pipeline`'s components that hires fix's second pass runs.

        Called once per engine (again if a component is replaced); the engine gives it the first
        pass's scheduler before each run, and calls `run` with it. The default builds
        ``diffusers.<img2img_class>`` over `pipeline`'s components and configuration, as diffusers'
        ``from_pipe`` does but casting nothing (`t2i_core.kit.pipeline_over`): nothing loads.
        """
        from ._modules import pipeline_over

        if self.img2img_class is None:
            raise UnsupportedFeatureError(self.name, "hires fix (GenerationRequest.hires)")
        with loading_lock:  # diffusers' lazy attribute lookup is not thread-safe
            import diffusers

            pipeline_class = getattr(diffusers, self.img2img_class)
        return pipeline_over(pipeline_class, pipeline)

    def hires_latents(self, pipeline: Any, latents: Any, height: int, width: int) -> Any:
        """The first pass's ``output_type="latent"`` output, stacked (one row per image), as the
        (batch, channels, `height` / f, `width` / f) latents that hires fix enlarges and `img2img_pipeline`
        takes as its ``image``. The default returns `latents` unchanged; a family whose pipeline
        packs its latents (FLUX.1's 2x2 patches) unpacks them here.
        """
        return latents

    # -- generation ------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> dict[str, Any]:
        """Validate `request.options` against `options`; return every option, typed, defaults filled."""
        known = {option.name: option for option in self.options}
        values: dict[str, Any] = {}
        for key, value in request.options.items():
            if key not in known:
                allowed = ", ".join(sorted(known)) or "none"
                raise InvalidRequestError(f"options[{key!r}]", value, f"an option of family {self.name!r}: {allowed}")
            values[key] = known[key].coerce(value)
        for option in self.options:
            values.setdefault(option.name, option.default)
        return values

    def check_request(self, pipeline: Any, request: GenerationRequest) -> None:
        """Refuse a request that the loaded `pipeline` cannot run, before any work starts.

        Called by `Engine.resolve` and `Engine.generate` after `check`, with the resolved request
        (defaults filled in, seed set). Raise a `T2IError` that names the field, e.g.
        ``InvalidRequestError("height", 72, "a multiple of 16")`` for a transformer whose sizes
        must be multiples of the VAE factor times the patch size. The default accepts every request.
        """

    def call_kwargs(self, request: GenerationRequest, options: Mapping[str, Any]) -> dict[str, Any]:
        """The pipeline arguments for a fully resolved request (defaults filled, seed set), minus generators."""
        return {
            "prompt": request.prompt,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "num_images_per_prompt": request.num_images,
        }

    def run(self, pipeline: Any, kwargs: dict[str, Any], progress: ProgressCallback | None = None) -> list[Image]:
        """Call `pipeline` with `kwargs` and return its images, reporting each step to `progress`.

        Progress goes through what the pipeline's ``__call__`` offers: diffusers'
        ``callback_on_step_end``, else the older ``callback(step, timestep, latents)`` with
        ``callback_steps=1`` (PixArt-Sigma, Kandinsky 2.1, ...), never a keyword the pipeline
        would swallow unused. With a `progress` callback, a pipeline that offers neither is refused
        with `UnsupportedFeatureError` before it runs: override `run` to report its steps with
        `t2i_core.kit.report_progress`.
        """
        if progress is not None:
            kwargs = {**kwargs, **_progress_kwargs(self, pipeline, kwargs, progress)}
        return list(pipeline(**kwargs).images)


#: set while a provider's `load_pipeline` runs in this thread, so that its ``super().load()`` loads
_loading = threading.local()


def load_pipeline_of(
    provider: ModelProvider, source: str, load_kwargs: Mapping[str, Any], model_index: Mapping[str, Any] | None
) -> Any:
    """`provider.load_pipeline(...)`, as the engine calls it."""
    previous = getattr(_loading, "active", False)
    _loading.active = True
    try:
        return provider.load_pipeline(source, load_kwargs, model_index)
    finally:
        _loading.active = previous


def _model_index(source: str) -> dict[str, Any] | None:
    """`source`'s ``model_index.json``, or None when it has none (or it cannot be fetched)."""
    try:
        return read_model_index(source, source, Path(source).is_dir())
    except ModelNotFoundError:
        return None


#: Names plugins imported from here before t2i 0.2, now in `t2i_core.kit` (removed in 0.3).
_MOVED_TO_KIT = ("private_components", "report_progress", "ProgressCallback", "takes_latents")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_KIT:
        import warnings

        from . import _modules, _progress

        warnings.warn(
            f"t2i_core.provider.{name} is deprecated: import it from t2i_core.kit", DeprecationWarning, stacklevel=2
        )
        return getattr(_modules if name == "private_components" else _progress, name)
    raise AttributeError(f"module 't2i_core.provider' has no attribute {name!r}")
