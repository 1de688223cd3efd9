"""t2i model provider for Stable Diffusion 3 and 3.5 (``StableDiffusion3Pipeline``).

SD3 reads a prompt with CLIP-L, CLIP-G and T5-XXL. T5 is optional: the ``no-t5`` accelerator
(registered here) loads a checkpoint without it, saving its memory, and the request option
``t5=false`` runs without it on any engine; either way the images are those of diffusers loaded
with ``text_encoder_3=None``, which differ from the images made with T5. 3.5 Medium's skip-layer
guidance and the T5 sequence length are family options, under diffusers' names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from t2i_core import (
    Accelerator,
    FamilyDefaults,
    IncompatibleAcceleratorsError,
    InvalidRequestError,
    LoadContext,
    ModelNotFoundError,
    ModelProvider,
    Option,
    Preset,
    hookimpl,
)
from t2i_core.kit import load_single_file_component

if TYPE_CHECKING:
    from PIL.Image import Image

    from t2i_core import GenerationRequest
    from t2i_core.kit import ProgressCallback

__version__ = "0.1.0"

PIPELINE_CLASS = "StableDiffusion3Pipeline"
#: the T5 text encoder and its tokenizer: what loading without T5 leaves out
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")
#: the accelerator that loads a checkpoint without T5
NO_T5 = "no-t5"
#: the call-argument key under which `call_kwargs` asks `run` to leave T5 out (never a diffusers name)
WITHOUT_T5 = "t2i_sd3.without_t5"
#: the longest T5 prompt StableDiffusion3Pipeline accepts
MAX_SEQUENCE_LENGTH = 512

#: the model cards' defaults: SD3.5 Large (the family's), Large Turbo, 3.5 Medium, SD3 Medium
LARGE_DEFAULTS = FamilyDefaults(num_inference_steps=28, guidance_scale=3.5)
TURBO_DEFAULTS = FamilyDefaults(num_inference_steps=4, guidance_scale=0.0)
MEDIUM_35_DEFAULTS = FamilyDefaults(num_inference_steps=40, guidance_scale=4.5)
SD3_MEDIUM_DEFAULTS = FamilyDefaults(num_inference_steps=28, guidance_scale=7.0)

#: a tensor only the original (Stability AI) SD3 transformer layout has, bare, or as the all-in-one
#: files save it (diffusers' own single-file detection reads the same key)
_ORIGINAL_KEYS = (
    "joint_blocks.0.context_block.adaLN_modulation.1.bias",
    "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
)
#: tensors of an SD3Transformer2DModel saved in diffusers' layout as one file (FLUX.1's has no
#: pos_embed.proj, PixArt's no context_embedder)
_DIFFUSERS_KEYS = ("pos_embed.proj.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight")

#: the skip-layer guidance settings that mean something only with ``skip_guidance_layers``
SKIP_LAYER_SETTINGS = (
    Option(
        name="skip_layer_guidance_scale",
        type=float,
        default=2.8,
        minimum=0.0,
        help="how strongly skip-layer guidance pushes away from the prediction without the skipped layers",
    ),
    Option(
        name="skip_layer_guidance_start",
        type=float,
        default=0.01,
        minimum=0.0,
        maximum=1.0,
        help="the fraction of the steps after which skip-layer guidance starts",
    ),
    Option(
        name="skip_layer_guidance_stop",
        type=float,
        default=0.2,
        minimum=0.0,
        maximum=1.0,
        help="the fraction of the steps before which skip-layer guidance stops",
    ),
)
SKIP_GUIDANCE_LAYERS = Option(
    name="skip_guidance_layers",
    type=str,
    default=None,
    help="skip-layer guidance (SLG): transformer blocks to skip in an extra guidance pass, comma-separated "
    "indices from 0 (SD3.5 Medium: '7,8,9'); None = none. Needs guidance_scale > 1",
)


class StableDiffusion3(ModelProvider):
    """Stable Diffusion 3 and 3.5: an MMDiT transformer read by CLIP-L, CLIP-G and (optionally) T5-XXL."""

    name = "sd3"
    aliases: ClassVar[Mapping[str, str]] = {
        "sd3": "stabilityai/stable-diffusion-3.5-large",
        "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
        "sd3.5-large-turbo": "stabilityai/stable-diffusion-3.5-large-turbo",
        "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
        "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    }
    pipeline_classes = (PIPELINE_CLASS,)
    img2img_class = "StableDiffusion3Img2ImgPipeline"
    # SD3.5 Large's model card; `pipeline_defaults` gives the other checkpoints' own. 1024x1024 is
    # read from the checkpoint (transformer sample_size x VAE factor), so tiny:sd3 stays tiny.
    defaults = LARGE_DEFAULTS
    description = "Stable Diffusion 3 / 3.5 (1024x1024, 28 steps, guidance 3.5), CLIP-L + CLIP-G + optional T5"
    options = (
        Option(
            name="t5",
            type=bool,
            default=True,
            help="read the prompt with T5 too; false = CLIP only (other images; to save T5's memory, "
            "load with the 'no-t5' accelerator, and then true is refused)",
        ),
        Option(
            name="max_sequence_length",
            type=int,
            default=256,
            minimum=1,
            maximum=MAX_SEQUENCE_LENGTH,
            help="T5 tokens the prompt is padded or cut to (changes the image even without T5)",
        ),
        SKIP_GUIDANCE_LAYERS,
        *SKIP_LAYER_SETTINGS,
    )
    # None of the shared (SD) schedulers fit a flow-matching model: the family offers its own.
    schedulers = ()
    named_schedulers: ClassVar[Mapping[str, tuple[str, Mapping[str, Any]]]] = {
        "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    }
    # A local checkpoint saved without T5 (no text_encoder_3/ folder) loads without it.
    skipped_components = T5_COMPONENTS
    tiny_version = 2
    # its single files may be GGUF too: the transformer loads quantized and stays so
    loads_gguf = True

    # -- discovery -------------------------------------------------------------------------
    def detect_single_file(self, keys: Collection[str]) -> bool:
        # An SD3 single file is read for its transformer: the original layout, or diffusers'.
        names = set(keys)
        return any(key in names for key in _ORIGINAL_KEYS) or all(key in names for key in _DIFFUSERS_KEYS)

    def build_tiny(self, folder: Path) -> None:
        from . import _tiny  # the tiny recipe (and t2i_core.tiny) loads for a build, not at registration

        _tiny.build(folder)

    # -- loading ---------------------------------------------------------------------------
    def load_pipeline(self, source: str, load_kwargs: Mapping[str, Any], model_index: Mapping[str, Any] | None) -> Any:
        if model_index is not None and model_index.get("_class_name") != PIPELINE_CLASS:
            found = model_index.get("_class_name")
            raise ModelNotFoundError(source, f"it is a {found}, not a {PIPELINE_CLASS}; check --family / family=")
        from diffusers import StableDiffusion3Pipeline

        kwargs = dict(load_kwargs)
        if _saved_without_t5(source, model_index):
            kwargs.update(dict.fromkeys(T5_COMPONENTS))
        return StableDiffusion3Pipeline.from_pretrained(source, **kwargs)

    def load_single_file(self, file: str, config: str, load_kwargs: Mapping[str, Any]) -> Any:
        # The transformer comes from the file (diffusers converts the original layout); the text
        # encoders, tokenizers, VAE and scheduler from `config`, a diffusers folder with their weights.
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        transformer = load_single_file_component(SD3Transformer2DModel, file, config, load_kwargs, "transformer")
        kwargs = dict(load_kwargs)
        if _saved_without_t5(config, None):
            kwargs.update(dict.fromkeys(T5_COMPONENTS))
        return StableDiffusion3Pipeline.from_pretrained(config, transformer=transformer, **kwargs)

    def pipeline_defaults(self, pipeline: Any) -> FamilyDefaults:
        """The model card's defaults of the loaded checkpoint, told apart by its transformer.

        SD3.5 Medium's has dual attention (MMDiT-X), SD3 Medium's no query-key norm; Large Turbo's is
        Large's, so Turbo is told by its name (the hub id or folder it was loaded from says "turbo").
        """
        config = pipeline.transformer.config
        if getattr(config, "dual_attention_layers", None):
            return MEDIUM_35_DEFAULTS
        if getattr(config, "qk_norm", None) is None:
            return SD3_MEDIUM_DEFAULTS
        if "turbo" in str(getattr(pipeline, "name_or_path", "") or "").lower():
            return TURBO_DEFAULTS
        return LARGE_DEFAULTS

    # -- generation ------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> dict[str, Any]:
        # skip_guidance_layers is a list of indices: '7,8,9' on the command line, a list in Python or JSON.
        given = dict(request.options)
        layers = _layers(given.pop(SKIP_GUIDANCE_LAYERS.name, None))
        options = super().check(request.evolve(options=given))
        options[SKIP_GUIDANCE_LAYERS.name] = layers
        if layers is None:
            for setting in SKIP_LAYER_SETTINGS:
                if setting.name in given:
                    field = f"options[{setting.name!r}]"
                    raise InvalidRequestError(field, given[setting.name], "no value unless skip_guidance_layers is set")
        elif options["skip_layer_guidance_start"] >= options["skip_layer_guidance_stop"]:
            raise InvalidRequestError(
                "options['skip_layer_guidance_stop']",
                options["skip_layer_guidance_stop"],
                f"a fraction above skip_layer_guidance_start ({options['skip_layer_guidance_start']})",
            )
        return options

    def check_request(self, pipeline: Any, request: GenerationRequest) -> None:
        _check_size(pipeline, request)
        options = self.check(request)
        if options["t5"] and "t5" in request.options and pipeline.text_encoder_3 is None:
            raise InvalidRequestError(
                "options['t5']",
                request.options["t5"],
                f"false or unset: this engine was loaded without T5 (the {NO_T5!r} accelerator, or a checkpoint "
                f"saved without text_encoder_3/); load it without {NO_T5!r} to read prompts with T5",
            )
        layers = options[SKIP_GUIDANCE_LAYERS.name]
        if layers is not None:
            _check_skip_layer_guidance(pipeline, request, layers, options)

    def call_kwargs(self, request: GenerationRequest, options: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = super().call_kwargs(request, options)
        kwargs["max_sequence_length"] = options["max_sequence_length"]
        if options[SKIP_GUIDANCE_LAYERS.name] is not None:
            kwargs[SKIP_GUIDANCE_LAYERS.name] = list(options[SKIP_GUIDANCE_LAYERS.name])
            for setting in SKIP_LAYER_SETTINGS:
                kwargs[setting.name] = options[setting.name]
        if not options["t5"]:
            kwargs[WITHOUT_T5] = True
        return kwargs

    def run(self, pipeline: Any, kwargs: dict[str, Any], progress: ProgressCallback | None = None) -> list[Image]:
        if kwargs.pop(WITHOUT_T5, False) and pipeline.text_encoder_3 is not None:
            pipeline = without_t5(pipeline)
        return super().run(pipeline, kwargs, progress)


def without_t5(pipeline: Any) -> Any:
    """A view of `pipeline` without T5, over the same weights, for one call.

    diffusers then feeds the transformer zeros where T5's embeddings go, exactly as a pipeline
    loaded with ``text_encoder_3=None``. The attributes are set past ``DiffusionPipeline.__setattr__``,
    which would rewrite the configuration the engine's pipeline shares.
    """
    view = copy.copy(pipeline)
    for name in T5_COMPONENTS:
        object.__setattr__(view, name, None)
    return view


def _saved_without_t5(source: str, model_index: Mapping[str, Any] | None) -> bool:
    """Whether the checkpoint has no T5: ``model_index.json`` says none, or a local folder lacks it."""
    spec = (model_index or {}).get("text_encoder_3")
    if model_index is not None and (not isinstance(spec, list) or None in spec):
        return True
    folder = Path(source)
    return folder.is_dir() and not (folder / "text_encoder_3").is_dir()


def _layers(value: Any) -> tuple[int, ...] | None:
    """``skip_guidance_layers`` as a tuple of block indices: from '7,8,9', [7, 8, 9] or 7."""
    field = f"options[{SKIP_GUIDANCE_LAYERS.name!r}]"
    allowed = "transformer block indices: comma-separated whole numbers >= 0 (e.g. '7,8,9'), or a list of them"
    if value is None:
        return None
    items: Any = value
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    if not isinstance(items, (list, tuple)) or not items:
        raise InvalidRequestError(field, value, allowed)
    layers: list[int] = []
    for item in items:
        if isinstance(item, str) and item.isdigit():
            item = int(item)
        if not isinstance(item, int) or isinstance(item, bool) or item < 0:
            raise InvalidRequestError(field, value, allowed)
        layers.append(item)
    if len(set(layers)) != len(layers):
        raise InvalidRequestError(field, value, "each block index once")
    return tuple(layers)


def _check_size(pipeline: Any, request: GenerationRequest) -> None:
    # The transformer sees the latents in patches, and its position embedding covers a fixed grid.
    factor, patch = int(pipeline.vae_scale_factor), int(pipeline.transformer.config.patch_size)
    grid = pipeline.transformer.config.pos_embed_max_size
    largest = None if grid is None else int(grid) * patch * factor
    for field in ("height", "width"):
        value = getattr(request, field)
        if value % (factor * patch):
            raise InvalidRequestError(
                field, value, f"a multiple of {factor * patch} (VAE factor {factor} x patch {patch})"
            )
        if largest is not None and value > largest:
            raise InvalidRequestError(
                field, value, f"at most {largest} (the transformer's position embedding covers {grid} patches a side)"
            )


def _check_skip_layer_guidance(
    pipeline: Any, request: GenerationRequest, layers: tuple[int, ...], options: Mapping[str, Any]
) -> None:
    field = f"options[{SKIP_GUIDANCE_LAYERS.name!r}]"
    depth = int(pipeline.transformer.config.num_layers)
    outside = [layer for layer in layers if layer >= depth]
    if outside:
        raise InvalidRequestError(
            field,
            request.options[SKIP_GUIDANCE_LAYERS.name],
            f"block indices from 0 to {depth - 1} (this transformer has {depth})",
        )
    # diffusers applies skip-layer guidance inside classifier-free guidance only, and only at the
    # steps i with start x steps < i < stop x steps: refuse what it would silently ignore.
    assert request.guidance_scale is not None and request.num_inference_steps is not None
    if request.guidance_scale <= 1:
        raise InvalidRequestError(
            "guidance_scale", request.guidance_scale, "> 1 with skip_guidance_layers (SLG works within CFG)"
        )
    steps = request.num_inference_steps
    start, stop = options["skip_layer_guidance_start"], options["skip_layer_guidance_stop"]
    if not any(start * steps < step < stop * steps for step in range(steps)):
        raise InvalidRequestError(
            field,
            request.options[SKIP_GUIDANCE_LAYERS.name],
            f"a guidance window that holds a step: with {steps} steps, start {start} and stop {stop} hold none "
            "(steps i with start x steps < i < stop x steps get SLG); widen the window or take more steps",
        )


class WithoutT5(Accelerator):
    """Load a Stable Diffusion 3 checkpoint without its T5 text encoder (CLIP-L and CLIP-G only)."""

    name = NO_T5
    phase = "memory"
    lossless = False
    description = (
        "sd3 only: load without the T5-XXL text encoder (about 9.5 GB in bf16 for SD3.5); prompts are read by "
        "CLIP alone, so images differ from those with T5"
    )

    def check(self, context: LoadContext) -> None:
        if context.family != StableDiffusion3.name:
            raise IncompatibleAcceleratorsError(
                [self.name], f"it leaves out the T5 encoder of family 'sd3', not of family {context.family!r}"
            )

    def load_kwargs(self, context: LoadContext) -> dict[str, Any]:
        return dict.fromkeys(T5_COMPONENTS)


@hookimpl
def register_providers(register: Callable[[ModelProvider], None]) -> None:
    register(StableDiffusion3())


@hookimpl
def register_accelerators(register: Callable[[Accelerator | Preset], None]) -> None:
    register(WithoutT5())
