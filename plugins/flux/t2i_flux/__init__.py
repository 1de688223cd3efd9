"""t2i model provider for FLUX.1 (``FluxPipeline``): dev-style and schnell-style checkpoints.

A checkpoint is dev-style when its transformer embeds the guidance scale (``guidance_embeds``):
``guidance_scale`` is then that embedded guidance. Schnell-style checkpoints have no guidance
embedding, so a guidance scale they would ignore is refused. Negative prompts go through true
classifier-free guidance (option ``true_cfg_scale``), never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from t2i_core import FamilyDefaults, InvalidRequestError, ModelNotFoundError, ModelProvider, Option, hookimpl
from t2i_core.kit import load_single_file_component

if TYPE_CHECKING:
    from PIL.Image import Image

    from t2i_core import GenerationRequest
    from t2i_core.kit import ProgressCallback

__version__ = "0.1.0"

PIPELINE_CLASS = "FluxPipeline"
#: FLUX.1-dev's model card: 28 steps, embedded guidance 3.5, T5 prompts of up to 512 tokens
DEV_DEFAULTS = FamilyDefaults(num_inference_steps=28, guidance_scale=3.5)
#: FLUX.1-schnell's model card: 4 steps, no guidance (the transformer has no guidance embedding)
SCHNELL_DEFAULTS = FamilyDefaults(num_inference_steps=4, guidance_scale=0.0)
DEV_MAX_SEQUENCE_LENGTH = 512
SCHNELL_MAX_SEQUENCE_LENGTH = 256
#: the longest T5 prompt FluxPipeline accepts
MAX_SEQUENCE_LENGTH = 512

#: tensor names only the original (Black Forest Labs) FLUX.1 transformer layout has, bare or as
#: ComfyUI saves them (diffusers' own single-file detection reads the same key)
_BFL_KEYS = (
    "double_blocks.0.img_attn.norm.key_norm.scale",
    "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
)
#: tensor names of a FluxTransformer2DModel saved in diffusers' layout as one file
_DIFFUSERS_KEYS = ("single_transformer_blocks.0.proj_mlp.weight", "time_text_embed.timestep_embedder.linear_1.weight")


def is_schnell(pipeline: Any) -> bool:
    """Whether `pipeline`'s transformer has no guidance embedding (FLUX.1-schnell and its kind)."""
    return not bool(pipeline.transformer.config.guidance_embeds)


class Flux(ModelProvider):
    """FLUX.1: a rectified-flow transformer read by CLIP-L (pooled) and T5-XXL (sequence) embeddings."""

    name = "flux"
    aliases: ClassVar[Mapping[str, str]] = {
        "flux": "black-forest-labs/FLUX.1-dev",
        "flux-dev": "black-forest-labs/FLUX.1-dev",
        "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    }
    pipeline_classes = (PIPELINE_CLASS,)
    img2img_class = "FluxImg2ImgPipeline"
    # The class-wide defaults are dev-style; `pipeline_defaults` gives a schnell-style checkpoint's.
    defaults = DEV_DEFAULTS
    description = "FLUX.1 dev/schnell (1024x1024; dev: 28 steps, guidance 3.5; schnell: 4 steps), true CFG"
    options = (
        Option(
            name="true_cfg_scale",
            type=float,
            default=1.0,
            minimum=1.0,
            help="true classifier-free guidance with the negative prompt (diffusers' true_cfg_scale); "
            "> 1 needs a negative_prompt, and a negative_prompt needs it > 1",
        ),
        Option(
            name="max_sequence_length",
            type=int,
            default=None,
            minimum=1,
            maximum=MAX_SEQUENCE_LENGTH,
            help="T5 tokens the prompt is padded or cut to; None = 512 (dev-style), 256 (schnell-style)",
        ),
    )
    # None of the shared (SD) schedulers fit a flow-matching model: the family offers its own.
    schedulers = ()
    named_schedulers: ClassVar[Mapping[str, tuple[str, Mapping[str, Any]]]] = {
        "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    }
    tiny_version = 1
    # its single files may be GGUF too: the transformer loads quantized and stays so
    loads_gguf = True

    # -- discovery -------------------------------------------------------------------------
    def detect_single_file(self, keys: Collection[str]) -> bool:
        # A FLUX.1 single file is its transformer alone: the original layout, or diffusers'.
        names = set(keys)
        return any(key in names for key in _BFL_KEYS) or all(key in names for key in _DIFFUSERS_KEYS)

    def build_tiny(self, folder: Path) -> None:
        from . import _tiny  # the tiny recipe (and t2i_core.tiny) loads for a build, not at registration

        _tiny.build(folder, guidance_embeds=True)

    # -- loading ---------------------------------------------------------------------------
    def load_pipeline(self, source: str, load_kwargs: Mapping[str, Any], model_index: Mapping[str, Any] | None) -> Any:
        if model_index is not None and model_index.get("_class_name") != PIPELINE_CLASS:
            found = model_index.get("_class_name")
            raise ModelNotFoundError(source, f"it is a {found}, not a {PIPELINE_CLASS}; check --family / family=")
        from diffusers import FluxPipeline

        return FluxPipeline.from_pretrained(source, **load_kwargs)

    def load_single_file(self, file: str, config: str, load_kwargs: Mapping[str, Any]) -> Any:
        # diffusers' from_single_file on FluxPipeline expects every component in the file; FLUX.1
        # files (.safetensors or GGUF) hold the transformer only, so the rest comes from `config`.
        from diffusers import FluxPipeline, FluxTransformer2DModel

        transformer = load_single_file_component(FluxTransformer2DModel, file, config, load_kwargs, "transformer")
        return FluxPipeline.from_pretrained(config, transformer=transformer, **load_kwargs)

    def native_size(self, pipeline: Any) -> tuple[int, int]:
        # FluxPipeline's default is default_sample_size (128) x the VAE factor: 1024 for FLUX.1,
        # which is also its VAE's sample_size. The VAE config is read first so that a tiny
        # checkpoint can say it is made for a small size (FluxPipeline's 128 is hard-coded).
        size = getattr(pipeline.vae.config, "sample_size", None)
        if isinstance(size, (list, tuple)):
            return int(size[0]), int(size[1])
        if isinstance(size, int):
            return size, size
        side = int(pipeline.default_sample_size) * int(pipeline.vae_scale_factor)
        return side, side

    def pipeline_defaults(self, pipeline: Any) -> FamilyDefaults:
        """The defaults for `pipeline`: schnell-style checkpoints have their own (4 steps, no guidance)."""
        return SCHNELL_DEFAULTS if is_schnell(pipeline) else DEV_DEFAULTS

    def hires_latents(self, pipeline: Any, latents: Any, height: int, width: int) -> Any:
        # FluxPipeline's latent output is packed in 2x2 patches: (batch, tokens, channels x 4).
        return pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)

    # -- generation ------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> dict[str, Any]:
        options = super().check(request)
        scale = options["true_cfg_scale"]
        field = "options['true_cfg_scale']"
        if request.negative_prompt is not None and scale <= 1.0:
            raise InvalidRequestError(
                field,
                scale,
                "a number > 1 with a negative_prompt: FLUX.1 takes a negative prompt only through true CFG "
                "(e.g. options={'true_cfg_scale': 4.0}), which runs the transformer twice per step",
            )
        if request.negative_prompt is None and scale > 1.0:
            raise InvalidRequestError(field, scale, "1.0 without a negative_prompt (true CFG guides away from one)")
        return options

    def check_request(self, pipeline: Any, request: GenerationRequest) -> None:
        # Latents are packed in 2x2 patches: each side must be whole patches of whole latent pixels.
        multiple = int(pipeline.vae_scale_factor) * 2
        for field in ("height", "width"):
            value = getattr(request, field)
            if value % multiple:
                allowed = f"a multiple of {multiple} (VAE factor {pipeline.vae_scale_factor} x 2x2 latent patches)"
                raise InvalidRequestError(field, value, allowed)
        if is_schnell(pipeline) and request.guidance_scale not in _schnell_guidance():
            allowed = " or ".join(f"{value:g}" for value in _schnell_guidance())
            raise InvalidRequestError(
                "guidance_scale",
                request.guidance_scale,
                f"{allowed} (unset): schnell-style checkpoints have no guidance embedding, so diffusers would "
                "ignore any other value; for guidance use a negative_prompt with options['true_cfg_scale']",
            )

    def call_kwargs(self, request: GenerationRequest, options: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = super().call_kwargs(request, options)
        kwargs["true_cfg_scale"] = options["true_cfg_scale"]
        if options["max_sequence_length"] is not None:
            kwargs["max_sequence_length"] = options["max_sequence_length"]
        return kwargs

    def run(self, pipeline: Any, kwargs: dict[str, Any], progress: ProgressCallback | None = None) -> list[Image]:
        # The T5 length a request leaves unset depends on the checkpoint, which call_kwargs cannot see.
        if "max_sequence_length" not in kwargs:
            schnell = is_schnell(pipeline)
            kwargs = {**kwargs, "max_sequence_length": _default_max_sequence_length(schnell)}
        return super().run(pipeline, kwargs, progress)


def _schnell_guidance() -> tuple[float, ...]:
    """The guidance scales a schnell-style request may carry: none (0), or the family-wide default the engine fills in."""
    return tuple(dict.fromkeys((SCHNELL_DEFAULTS.guidance_scale, Flux.defaults.guidance_scale)))


def _default_max_sequence_length(schnell: bool) -> int:
    return SCHNELL_MAX_SEQUENCE_LENGTH if schnell else DEV_MAX_SEQUENCE_LENGTH


@hookimpl
def register_providers(register: Callable[[ModelProvider], None]) -> None:
    register(Flux())
