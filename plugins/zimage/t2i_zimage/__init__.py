"""t2i model provider for Z-Image (``ZImagePipeline``): Tongyi-MAI's single-stream diffusion transformer.

The prompt is read by a Qwen3 model through its chat template. Z-Image-Turbo is distilled to run
without classifier-free guidance (guidance 0, 9 steps); ``guidance_scale > 0`` turns CFG on, and
with it the negative prompt and the options ``cfg_normalization`` and ``cfg_truncation``, which
are refused without it rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from t2i_core import FamilyDefaults, InvalidRequestError, ModelNotFoundError, ModelProvider, Option, hookimpl
from t2i_core.kit import load_single_file_component

if TYPE_CHECKING:
    from t2i_core import GenerationRequest

__version__ = "0.1.0"

PIPELINE_CLASS = "ZImagePipeline"
#: Z-Image-Turbo's model card: 9 scheduler steps (8 transformer forwards), guidance 0
DEFAULTS = FamilyDefaults(num_inference_steps=9, guidance_scale=0.0)
#: ZImagePipeline's default prompt length in Qwen tokens
DEFAULT_MAX_SEQUENCE_LENGTH = 512
#: the longest prompt length Z-Image-Turbo's transformer has positions for (its caption RoPE table
#: holds 1536; the caption is padded to a multiple of 32 and the image starts one position after it)
MAX_SEQUENCE_LENGTH = 1504
#: ZImageTransformer2DModel pads the caption and image token sequences to multiples of this
_SEQUENCE_MULTIPLE = 32
#: tensor names of the original (Tongyi-MAI / ComfyUI) transformer layout, bare or prefixed: diffusers'
#: own single-file detection key, and the fused attention projection that only that layout has
_ORIGINAL_KEYS = ("layers.0.adaLN_modulation.0.weight", "layers.0.attention.qkv.weight")
_PREFIX = "model.diffusion_model."

CFG_NORMALIZATION = Option(
    name="cfg_normalization",
    type=float,
    default=None,
    minimum=0.0,
    help="with guidance_scale > 0: cap the guided prediction's norm at this multiple of the prompt-only "
    "prediction's (diffusers' cfg_normalization; True there = 1.0); None or 0 = no cap",
)
CFG_TRUNCATION = Option(
    name="cfg_truncation",
    type=float,
    default=None,
    minimum=0.0,
    maximum=1.0,
    help="with guidance_scale > 0: stop guiding once this fraction of the schedule (normalized time "
    "1 - t/1000) has passed (diffusers' cfg_truncation); None = 1.0, guide every step",
)
#: the options that only mean something with classifier-free guidance
CFG_OPTIONS = (CFG_NORMALIZATION, CFG_TRUNCATION)


class ZImage(ModelProvider):
    """Z-Image: a single-stream diffusion transformer over Qwen3 caption features and 2x2 latent patches."""

    name = "z-image"
    aliases: ClassVar[Mapping[str, str]] = {"z-image-turbo": "Tongyi-MAI/Z-Image-Turbo"}
    pipeline_classes = (PIPELINE_CLASS,)
    img2img_class = "ZImageImg2ImgPipeline"
    defaults = DEFAULTS
    description = "Z-Image(-Turbo), Qwen3 text encoder (1024x1024, 9 steps, guidance 0; CFG when guidance > 0)"
    options = (
        *CFG_OPTIONS,
        Option(
            name="max_sequence_length",
            type=int,
            default=DEFAULT_MAX_SEQUENCE_LENGTH,
            minimum=1,
            maximum=MAX_SEQUENCE_LENGTH,
            help="Qwen tokens the chat-templated prompt is cut to (diffusers' default 512; at most what the "
            "transformer has caption positions for: 1504 on Z-Image-Turbo)",
        ),
    )
    # None of the shared (SD) schedulers fit a flow-matching model: the family offers its own.
    # ZImagePipeline hands the scheduler its own sigmas and shift (mu): these are the
    # deterministic flow-matching schedulers that take both.
    schedulers = ()
    named_schedulers: ClassVar[Mapping[str, tuple[str, Mapping[str, Any]]]] = {
        "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
        "flow-euler-karras": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
    }
    tiny_version = 1
    # its single files may be GGUF too: the transformer loads quantized and stays so
    loads_gguf = True

    # -- discovery -------------------------------------------------------------------------
    def detect_single_file(self, keys: Collection[str]) -> bool:
        # A Z-Image single file is its transformer alone, in the original layout (as diffusers converts it).
        names = set(keys)
        return all(key in names or _PREFIX + key in names for key in _ORIGINAL_KEYS)

    def build_tiny(self, folder: Path) -> None:
        from . import _tiny  # the tiny recipe (and t2i_core.tiny) loads for a build, not at registration

        _tiny.build(folder)

    # -- loading ---------------------------------------------------------------------------
    def load_pipeline(self, source: str, load_kwargs: Mapping[str, Any], model_index: Mapping[str, Any] | None) -> Any:
        if model_index is not None and model_index.get("_class_name") != PIPELINE_CLASS:
            found = model_index.get("_class_name")
            raise ModelNotFoundError(source, f"it is a {found}, not a {PIPELINE_CLASS}; check --family / family=")
        from diffusers import ZImagePipeline

        return ZImagePipeline.from_pretrained(source, **load_kwargs)

    def load_single_file(self, file: str, config: str, load_kwargs: Mapping[str, Any]) -> Any:
        # Z-Image single files (z_image_turbo_bf16.safetensors and the like) hold the transformer
        # only (GGUF ones too): the text encoder, VAE, tokenizer and scheduler come from `config`.
        from diffusers import ZImagePipeline, ZImageTransformer2DModel

        transformer = load_single_file_component(ZImageTransformer2DModel, file, config, load_kwargs, "transformer")
        return ZImagePipeline.from_pretrained(config, transformer=transformer, **load_kwargs)

    def native_size(self, pipeline: Any) -> tuple[int, int]:
        # ZImagePipeline's default is a hard-coded 1024x1024, which is also its VAE's sample_size. The
        # VAE config is read first so that a tiny checkpoint can say it is made for a small size.
        size = getattr(pipeline.vae.config, "sample_size", None)
        if isinstance(size, (list, tuple)):
            return int(size[0]), int(size[1])
        if isinstance(size, int):
            return size, size
        return 1024, 1024

    def img2img_pipeline(self, pipeline: Any) -> Any:
        from diffusers.image_processor import VaeImageProcessor

        img2img = super().img2img_pipeline(pipeline)
        # ZImageImg2ImgPipeline's image processor takes only 4-channel tensors for latents (its default):
        # Z-Image's 16-channel hires latents would be resized and normalized as pixels. The same
        # processor, told the VAE's channel count, hands them on as latents (as FluxImg2ImgPipeline's does).
        channels = int(pipeline.vae.config.latent_channels)
        factor = int(img2img.vae_scale_factor) * 2
        img2img.image_processor = VaeImageProcessor(vae_scale_factor=factor, vae_latent_channels=channels)
        return img2img

    # -- generation ------------------------------------------------------------------------
    def check_request(self, pipeline: Any, request: GenerationRequest) -> None:
        _check_size(pipeline, request)
        options = self.check(request)
        if request.guidance_scale == 0:
            _check_without_guidance(request, options)
        limit = max_sequence_length(pipeline)
        if options["max_sequence_length"] > limit:
            field = "options['max_sequence_length']"
            allowed = f"an integer in [1, {limit}] (the caption positions of this checkpoint's transformer)"
            raise InvalidRequestError(field, options["max_sequence_length"], allowed)

    def call_kwargs(self, request: GenerationRequest, options: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = super().call_kwargs(request, options)
        for option in CFG_OPTIONS:
            if options[option.name] is not None:
                kwargs[option.name] = options[option.name]
        kwargs["max_sequence_length"] = options["max_sequence_length"]
        return kwargs


def max_sequence_length(pipeline: Any) -> int:
    """The longest ``max_sequence_length`` whose caption and image positions fit `pipeline`'s transformer."""
    caption_positions = int(pipeline.transformer.config.axes_lens[0])
    # Caption tokens take positions 1..L (L padded to a multiple of 32), the image starts at L + 1.
    return (caption_positions - 2) // _SEQUENCE_MULTIPLE * _SEQUENCE_MULTIPLE


def _check_size(pipeline: Any, request: GenerationRequest) -> None:
    # The transformer sees 2x2 patches of latent pixels: each side must be whole patches, and no
    # longer than its position table (512 patches, 8192 pixels, on Z-Image-Turbo).
    factor = int(pipeline.vae_scale_factor)
    patch = int(pipeline.transformer.config.all_patch_size[0])
    multiple = factor * patch
    axes_lens = pipeline.transformer.config.axes_lens
    for field, positions in (("height", int(axes_lens[1])), ("width", int(axes_lens[2]))):
        value = getattr(request, field)
        if value % multiple:
            allowed = f"a multiple of {multiple} (VAE factor {factor} x {patch}x{patch} latent patches)"
            raise InvalidRequestError(field, value, allowed)
        if value > positions * multiple:
            allowed = f"a multiple of {multiple} up to {positions * multiple} (the transformer's positions)"
            raise InvalidRequestError(field, value, allowed)


def _check_without_guidance(request: GenerationRequest, options: Mapping[str, Any]) -> None:
    # ZImagePipeline runs CFG only for guidance_scale > 0, and otherwise ignores the negative prompt
    # and the CFG options: asking for them at guidance 0 is a mistake, not a no-op.
    if request.negative_prompt is not None:
        raise InvalidRequestError(
            "guidance_scale",
            request.guidance_scale,
            "a number > 0 with a negative_prompt: Z-Image takes a negative prompt only through "
            "classifier-free guidance (e.g. guidance_scale=4.0), which runs the transformer twice per step",
        )
    for option in CFG_OPTIONS:
        if option.name in request.options and options[option.name] is not None:
            field = f"options[{option.name!r}]"
            raise InvalidRequestError(field, options[option.name], "no value unless guidance_scale > 0 (CFG)")


@hookimpl
def register_providers(register: Callable[[ModelProvider], None]) -> None:
    register(ZImage())
