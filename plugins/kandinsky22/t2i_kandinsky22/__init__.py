"""t2i model provider for Kandinsky 2.2: a prior turns the prompt into a CLIP image embedding, a decoder draws it.

It loads combined checkpoints (``KandinskyV22CombinedPipeline``) and decoder-only ones
(``KandinskyV22Pipeline``), which it pairs with a prior (see `t2i_kandinsky22._prior`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from t2i_core import FamilyDefaults, InvalidRequestError, ModelNotFoundError, ModelProvider, Option, hookimpl
from t2i_core.kit import private_components, report_progress

from . import _tiny
from ._prior import COMBINED, DECODER, DEFAULT_PRIOR, Priors, model_card_prior

if TYPE_CHECKING:
    from PIL.Image import Image

    from t2i_core import GenerationRequest
    from t2i_core.kit import ProgressCallback

#: the call-argument key under which `call_kwargs` hands the checked prior to `run` (never a diffusers name)
PRIOR = "t2i_kandinsky22.prior"
#: diffusers' size for a checkpoint whose UNet does not declare one
DIFFUSERS_SIZE = 512


class Kandinsky22(ModelProvider):
    name = "kandinsky22"
    aliases: ClassVar[Mapping[str, str]] = {"kandinsky22": "kandinsky-community/kandinsky-2-2-decoder"}
    pipeline_classes = (COMBINED, DECODER)
    # The decoder passes `generator` to scheduler.step() and never calls scale_model_input(): only
    # schedulers that take the one and need not the other denoise correctly (unipc, lms and pndm
    # raise; euler and euler-ancestral would run on unscaled inputs).
    schedulers = ("ddim", "ddpm", "dpm++-2m", "dpm++-2m-karras")
    # diffusers' defaults for the combined pipeline; 512x512 is read from the checkpoint (so tiny stays tiny).
    defaults = FamilyDefaults(num_inference_steps=100, guidance_scale=4.0)
    options = (
        Option(
            name="prior_num_inference_steps",
            type=int,
            default=25,
            minimum=1,
            help="denoising steps of the prior, which turns the prompt into an image embedding",
        ),
        Option(
            name="prior_guidance_scale",
            type=float,
            default=4.0,
            minimum=0.0,
            help="classifier-free guidance of the prior (guidance_scale is the decoder's)",
        ),
        Option(
            name="prior",
            type=str,
            default=None,
            help=(
                "the prior to use: 'tiny:kandinsky22', 'kandinsky22-prior', a local folder or a hub id; "
                f"None = the checkpoint's own (a decoder's model card names it, else {DEFAULT_PRIOR})"
            ),
        ),
    )
    description = "Kandinsky 2.2, prior + decoder (512x512, 100 steps, guidance 4.0; prior 25 steps, guidance 4.0)"
    tiny_version = _tiny.VERSION

    def __init__(self) -> None:
        self._priors = Priors(self.name)

    def build_tiny(self, folder: Path) -> None:
        _tiny.build(folder)

    # -- loading ---------------------------------------------------------------------------
    def load(self, source: str, load_kwargs: Mapping[str, Any]) -> Any:
        from diffusers import KandinskyV22CombinedPipeline, KandinskyV22Pipeline

        from t2i_core.kit import read_model_index

        class_name = read_model_index(source, source, is_local=Path(source).is_dir()).get("_class_name")
        if class_name == COMBINED:
            pipeline = KandinskyV22CombinedPipeline.from_pretrained(source, **load_kwargs)
            self._priors.remember(pipeline, load_kwargs)
        elif class_name == DECODER:
            # The prior is loaded when a request first needs it, so that options["prior"] can replace it.
            pipeline = KandinskyV22Pipeline.from_pretrained(source, **load_kwargs)
            self._priors.remember(pipeline, load_kwargs, model_card_prior(source) or DEFAULT_PRIOR)
        else:
            raise ModelNotFoundError(
                source,
                f"its pipeline class {class_name!r} is not Kandinsky 2.2 text-to-image: expected {COMBINED} or {DECODER}",
            )
        return pipeline

    def share(self, pipeline: Any) -> Any:
        # The combined pipeline builds its prior and decoder sub-pipelines from its components.
        return type(pipeline)(**private_components(pipeline))

    def native_size(self, pipeline: Any) -> tuple[int, int]:
        # The UNet declares the latent size it was trained at; the MoVQ makes one pixel of it `factor`.
        factor = _movq_factor(pipeline)
        sample = pipeline.unet.config.sample_size
        if sample is None:
            return DIFFUSERS_SIZE, DIFFUSERS_SIZE
        height, width = (sample, sample) if isinstance(sample, int) else sample
        return int(height) * factor, int(width) * factor

    def scheduler_owner(self, pipeline: Any) -> Any:
        # The combined pipeline calls its decoder_pipe, which holds its own reference to the scheduler.
        return getattr(pipeline, "decoder_pipe", pipeline)

    def prior_for(self, pipeline: Any, prior: str | None = None) -> Any:
        """The combined pipeline that `run` uses for an engine's `pipeline` with ``options["prior"] = prior``."""
        source = None if prior is None else self._priors.resolve(prior)
        return self._priors.pipeline_for(pipeline, self.scheduler_owner(pipeline), source)

    # -- generation ------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> dict[str, Any]:
        options = super().check(request)
        if options["prior"] is not None:
            self._priors.resolve(options["prior"])
        return options

    def check_request(self, pipeline: Any, request: GenerationRequest) -> None:
        # Before the prior runs: the decoder cannot make every size.
        _check_size(pipeline, {"height": request.height, "width": request.width})

    def call_kwargs(self, request: GenerationRequest, options: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = super().call_kwargs(request, options)
        kwargs["prior_num_inference_steps"] = options["prior_num_inference_steps"]
        kwargs["prior_guidance_scale"] = options["prior_guidance_scale"]
        if options["prior"] is not None:
            kwargs[PRIOR] = self._priors.resolve(options["prior"])
        return kwargs

    def run(self, pipeline: Any, kwargs: dict[str, Any], progress: ProgressCallback | None = None) -> list[Image]:
        _check_size(pipeline, kwargs)
        rest = {name: value for name, value in kwargs.items() if name != PRIOR}
        combined = self._priors.pipeline_for(pipeline, self.scheduler_owner(pipeline), kwargs.get(PRIOR))
        # The combined pipeline always hands callback_steps=1 to its decoder, which then warns that
        # the argument is deprecated on every call; None is what it means.
        rest["callback_steps"] = None
        generators = rest.get("generator")
        if rest.get("negative_prompt") is not None and isinstance(generators, list):
            # diffusers' prior encodes the negative prompt in the same batch as the prompt and seeds
            # that batch of 2n with n generators, which fails: make each image as its lone run does.
            calls = [{**rest, "generator": generator, "num_images_per_prompt": 1} for generator in generators]
        else:
            calls = [rest]
        images: list[Image] = []
        for index, call in enumerate(calls):
            if progress is not None:
                call["callback_on_step_end"] = _progress(progress, index, len(calls))
            images.extend(combined(**call).images)
        return images


def _movq_factor(pipeline: Any) -> int:
    """How many image pixels one latent pixel stands for (diffusers' ``movq_scale_factor``)."""
    return int(2 ** (len(pipeline.movq.config.block_out_channels) - 1))


def _check_size(pipeline: Any, kwargs: Mapping[str, Any]) -> None:
    # The decoder rounds each side up to whole cells of factor² pixels (diffusers'
    # downscale_height_and_width): any other size would come back larger than asked for.
    cell = _movq_factor(pipeline) ** 2
    for field in ("height", "width"):
        if kwargs[field] % cell:
            allowed = (
                f"a multiple of {cell} for this Kandinsky 2.2 checkpoint, whose decoder works in {cell}-pixel cells"
            )
            raise InvalidRequestError(field, kwargs[field], allowed)


def _progress(progress: ProgressCallback, index: int, count: int) -> Callable[..., dict[str, Any]]:
    """Report decoder step `step` of call `index` (of `count` equal calls) as one run of count x steps."""

    def on_step_end(decoder: Any, step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        total = int(decoder.num_timesteps)
        report_progress(progress, index * total + step + 1, count * total)
        return callback_kwargs

    return on_step_end


@hookimpl
def register_providers(register: Callable[[ModelProvider], None]) -> None:
    register(Kandinsky22())
