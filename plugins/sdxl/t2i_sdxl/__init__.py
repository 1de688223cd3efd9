"""t2i model provider for Stable Diffusion XL (``StableDiffusionXLPipeline``), with the optional refiner.

Micro-conditioning and the second text encoder's prompts are family options; the refiner runs
as diffusers' ensemble of expert denoisers (see `t2i_sdxl._refiner`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from t2i_core import (
    FamilyDefaults,
    InvalidRequestError,
    ModelProvider,
    Option,
    UnsupportedFeatureError,
    hookimpl,
)

from ._clip_skip import CLIP_SKIP, check_clip_skip, skipped_prompt_embeds

if TYPE_CHECKING:
    from PIL.Image import Image

    from t2i_core import GenerationRequest
    from t2i_core.kit import ProgressCallback

    from ._refiner import Refiners

#: the call-argument key under which `call_kwargs` hands a `RefinerPlan` to `run` (never a diffusers name)
REFINER = "t2i_sdxl.refiner"


def _pair(name: str, minimum: int, help: str) -> Option:
    return Option(name=name, type=int, default=None, length=2, minimum=minimum, help=help)


#: options passed to the pipeline under their own name, and only when set: unset = diffusers' default
PIPELINE_OPTIONS = (
    Option(name="prompt_2", type=str, default=None, help="the prompt for the second text encoder; None = prompt"),
    Option(
        name="negative_prompt_2",
        type=str,
        default=None,
        help="the negative prompt for the second text encoder; None = negative_prompt",
    ),
    _pair("original_size", 1, "micro-conditioning (height, width) of the training image; None = the output size"),
    _pair("crops_coords_top_left", 0, "micro-conditioning (top, left) of the training crop; None = (0, 0)"),
    _pair("target_size", 1, "micro-conditioning (height, width) the image is made for; None = the output size"),
    _pair("negative_original_size", 1, "an original_size to steer away from, with negative_target_size; None = none"),
    _pair(
        "negative_crops_coords_top_left",
        0,
        "a crops_coords_top_left to steer away from, with both negative sizes; None = (0, 0)",
    ),
    _pair("negative_target_size", 1, "a target_size to steer away from, with negative_original_size; None = none"),
)
#: prompt weightings that encode the prompt themselves, without skipping CLIP layers
WEIGHTINGS_WITHOUT_CLIP_SKIP = ("compel", "compel-long")
#: options that only mean something with a refiner
REFINER_OPTIONS = (
    Option(
        name="high_noise_frac",
        type=float,
        default=0.8,
        minimum=0.01,
        maximum=0.99,
        help="the fraction of the schedule the base denoises before the refiner takes over",
    ),
    Option(
        name="aesthetic_score",
        type=float,
        default=None,
        minimum=0.0,
        maximum=10.0,
        help="the refiner's aesthetic-score conditioning; None = diffusers' 6.0",
    ),
    Option(
        name="negative_aesthetic_score",
        type=float,
        default=None,
        minimum=0.0,
        maximum=10.0,
        help="the aesthetic score to steer away from; None = diffusers' 2.5",
    ),
)
REFINER_OPTION = Option(
    name="refiner",
    type=str,
    default=None,
    help="a refiner to finish the schedule: 'tiny:sdxl-refiner', 'sdxl-refiner', a local folder or a hub id",
)


class StableDiffusionXL(ModelProvider):
    name = "sdxl"
    aliases: ClassVar[Mapping[str, str]] = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
    pipeline_classes = ("StableDiffusionXLPipeline",)
    img2img_class = "StableDiffusionXLImg2ImgPipeline"
    # 1024x1024 is the checkpoint's native size, read from its UNet config (so tiny:sdxl stays tiny).
    defaults = FamilyDefaults(num_inference_steps=50, guidance_scale=5.0)
    options = (*PIPELINE_OPTIONS, CLIP_SKIP, REFINER_OPTION, *REFINER_OPTIONS)
    description = "Stable Diffusion XL (1024x1024, 50 steps, guidance 5.0), with the optional refiner"
    # 2: the second text encoder is wider than the first, as in the real checkpoint (single files)
    tiny_version = 2

    def __init__(self) -> None:
        self._made_refiners: Refiners | None = None
        self._refiners_lock = threading.Lock()

    @property
    def _refiners(self) -> Refiners:
        """The refiner machinery (`t2i_sdxl._refiner`), imported with the first request that names a refiner."""
        if self._made_refiners is None:
            with self._refiners_lock:
                if self._made_refiners is None:
                    from ._refiner import Refiners

                    self._made_refiners = Refiners()
        return self._made_refiners

    def build_tiny(self, folder: Path) -> None:
        from . import _tiny  # the tiny recipe (and t2i_core.tiny) loads for a build, not at registration

        _tiny.build_base(folder)

    def detect_single_file(self, keys: Collection[str]) -> bool:
        # The original SDXL base layout: CLIP-L and OpenCLIP-G under conditioner.embedders.0 and .1
        # (the refiner has only OpenCLIP-G, under embedders.0).
        return (
            any(key.startswith("model.diffusion_model.") for key in keys)
            and any(key.startswith("conditioner.embedders.0.transformer.") for key in keys)
            and any(key.startswith("conditioner.embedders.1.model.") for key in keys)
        )

    def check(self, request: GenerationRequest) -> dict[str, Any]:
        options = super().check(request)
        _check_negative_micro_conditioning(options)
        if options.get("clip_skip") and request.prompt_weighting in WEIGHTINGS_WITHOUT_CLIP_SKIP:
            raise UnsupportedFeatureError(
                self.name,
                f"options['clip_skip'] together with prompt_weighting={request.prompt_weighting!r}",
                requested=f"clip_skip={options['clip_skip']}",
            )
        if options["refiner"] is None:
            for option in REFINER_OPTIONS:
                if option.name in request.options:
                    field = f"options[{option.name!r}]"
                    raise InvalidRequestError(
                        field, request.options[option.name], "no value unless options['refiner'] is set"
                    )
            return options
        if request.prompt_weighting is not None:
            raise UnsupportedFeatureError(self.name, "the refiner together with prompt weighting")
        if request.hires is not None:
            raise UnsupportedFeatureError(self.name, "the refiner together with hires fix (GenerationRequest.hires)")
        if request.controls:
            raise UnsupportedFeatureError(self.name, "the refiner together with ControlNet controls")
        if options.get("clip_skip"):
            raise UnsupportedFeatureError(self.name, "the refiner together with options['clip_skip']")
        self._refiners.resolve(options["refiner"])
        return options

    def check_request(self, pipeline: Any, request: GenerationRequest) -> None:
        check_clip_skip(pipeline, request.options)

    def call_kwargs(self, request: GenerationRequest, options: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = super().call_kwargs(request, options)
        for option in PIPELINE_OPTIONS:
            if options[option.name] is not None:
                kwargs[option.name] = options[option.name]
        if options.get("clip_skip"):
            kwargs["clip_skip"] = options["clip_skip"]
        if options["refiner"] is not None:
            from t2i_core.kit import DEFAULT_SCHEDULER

            from ._refiner import RefinerPlan

            extra = {name: options[name] for name in ("aesthetic_score", "negative_aesthetic_score")}
            kwargs[REFINER] = RefinerPlan(
                source=self._refiners.resolve(options["refiner"]),
                high_noise_frac=options["high_noise_frac"],
                scheduler=request.scheduler or DEFAULT_SCHEDULER,
                extra={name: value for name, value in extra.items() if value is not None},
            )
        return kwargs

    def run(self, pipeline: Any, kwargs: dict[str, Any], progress: ProgressCallback | None = None) -> list[Image]:
        plan = kwargs.get(REFINER)
        if plan is None:
            if kwargs.get("clip_skip"):
                kwargs = skipped_prompt_embeds(self.name, pipeline, kwargs)
            return super().run(pipeline, kwargs, progress)
        rest = {name: value for name, value in kwargs.items() if name != REFINER}
        return self._refiners.run(pipeline, rest, plan, progress)

    def refiner_for(self, pipeline: Any, refiner: str) -> Any:
        """The refiner pipeline that `run` uses with an engine's `pipeline` for ``options["refiner"] = refiner``."""
        return self._refiners.for_engine(pipeline, self._refiners.resolve(refiner)).pipeline


def _check_negative_micro_conditioning(options: Mapping[str, Any]) -> None:
    # diffusers' SDXL base silently ignores a negative size unless both are given.
    sizes = ("negative_original_size", "negative_target_size")
    given = [name for name in sizes if options[name] is not None]
    if options["negative_crops_coords_top_left"] is not None and not given:
        given = ["negative_crops_coords_top_left"]
    missing = [name for name in sizes if options[name] is None]
    if given and missing:
        allowed = f"a (height, width) pair too, as options[{given[0]!r}] is set (diffusers uses both or neither)"
        raise InvalidRequestError(f"options[{missing[0]!r}]", None, allowed)


@hookimpl
def register_providers(register: Callable[[ModelProvider], None]) -> None:
    register(StableDiffusionXL())
