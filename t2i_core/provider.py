"""The model-provider role: what a model-family plugin implements.

A provider recognises its checkpoints, loads them as a diffusers pipeline, fills in the
family's defaults, and runs the pipeline with the call arguments the conditioners built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from .errors import GenerationCancelled, InvalidRequestError, ModelNotFoundError

if TYPE_CHECKING:
    from PIL.Image import Image

    from .request import GenerationRequest

#: ``progress(step, total)``; returning ``False`` (or raising `GenerationCancelled`) cancels the generation
ProgressCallback = Callable[[int, int], "bool | None"]

_TYPE_NAMES = {int: "integer", float: "number", str: "text", bool: "boolean"}


@attrs.frozen(kw_only=True)
class FamilyDefaults:
    """A family's defaults; ``None`` size means the checkpoint's native size."""

    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5


@attrs.frozen(kw_only=True)
class Option:
    """A family option: a named, typed, bounded knob passed as ``GenerationRequest.options``."""

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    #: how many values (e.g. 2 for a (height, width) pair); 1 = a single value
    length: int = 1

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

    #: the family name (``family=`` / ``--family``)
    name: ClassVar[str]
    #: short names users may pass as ``model`` → the hub id they stand for
    aliases: ClassVar[Mapping[str, str]] = {}
    #: ``_class_name`` values of ``model_index.json`` that this family recognises
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[FamilyDefaults] = FamilyDefaults()
    options: ClassVar[tuple[Option, ...]] = ()
    #: one line for ``t2i plugins``
    description: ClassVar[str] = ""
    #: bump when the tiny checkpoint's recipe changes, so caches are rebuilt
    tiny_version: ClassVar[int] = 1
    #: the named schedulers (t2i_core.schedulers) the family's pipeline can run; None = all of them
    schedulers: ClassVar[tuple[str, ...] | None] = None

    # -- discovery -------------------------------------------------------------------------
    def detect(self, model_index: Mapping[str, Any]) -> bool:
        """Whether a checkpoint whose ``model_index.json`` is `model_index` belongs to this family."""
        return model_index.get("_class_name") in self.pipeline_classes

    def build_tiny(self, folder: Path) -> None:
        """Write a small random-weight checkpoint of this family into `folder` (a diffusers folder).

        Called once per cache; must be deterministic and must not touch the network.
        """
        raise NotImplementedError(f"family {self.name!r} offers no tiny checkpoint")

    def architecture_folder(self) -> Path | None:
        """The full-size architecture as config files only (``model_index.json`` and one JSON per
        component, no weights), shipped in the plugin's ``architecture/`` folder; None if absent.

        Benchmarks build random-weight full-size pipelines from it: speed does not depend on weights.
        """
        import sys

        module = sys.modules.get(type(self).__module__)
        if module is None or getattr(module, "__file__", None) is None:
            return None
        folder = Path(str(module.__file__)).resolve().parent / "architecture"
        return folder if (folder / "model_index.json").is_file() else None

    # -- loading ---------------------------------------------------------------------------
    def load(self, source: str, load_kwargs: Mapping[str, Any]) -> Any:
        """Load the pipeline from `source` (hub id or local folder) with diffusers' `from_pretrained` kwargs."""
        from diffusers import AutoPipelineForText2Image

        return AutoPipelineForText2Image.from_pretrained(source, **load_kwargs)

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
        for name, component in private_components(pipeline).items():
            setattr(shared, name, component)
        return shared

    def native_size(self, pipeline: Any) -> tuple[int, int]:
        """The (height, width) the checkpoint was made for."""
        size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        return int(size), int(size)

    def scheduler_owner(self, pipeline: Any) -> Any:
        """The (sub-)pipeline whose ``scheduler`` a request's scheduler choice replaces."""
        return pipeline

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
        """Call `pipeline` with `kwargs` and return its images."""
        if progress is not None:
            kwargs = {**kwargs, "callback_on_step_end": _step_callback(progress)}
        return list(pipeline(**kwargs).images)


def report_progress(progress: ProgressCallback, step: int, total: int) -> None:
    """Call `progress(step, total)`; raise `GenerationCancelled` when it asks to stop.

    Providers that run their own loops (several pipelines in a row) report through this.
    """
    if progress(step, total) is False:
        raise GenerationCancelled(f"generation cancelled at step {step} of {total}", step=step, total=total)


def _step_callback(progress: ProgressCallback) -> Callable[..., dict[str, Any]]:
    def on_step_end(pipeline: Any, step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        report_progress(progress, step + 1, int(getattr(pipeline, "num_timesteps", 0) or 0))
        return callback_kwargs

    return on_step_end


def private_components(pipeline: Any) -> dict[str, Any]:
    """`pipeline.components`, with every component that is not a torch module deep-copied."""
    import copy

    import torch

    return {
        name: component if component is None or isinstance(component, torch.nn.Module) else copy.deepcopy(component)
        for name, component in pipeline.components.items()
    }
