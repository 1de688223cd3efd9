"""t2i model provider for Stable Diffusion 1.x checkpoints (``StableDiffusionPipeline``)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from t2i_core import (
    FamilyDefaults,
    InvalidRequestError,
    ModelProvider,
    Option,
    UnsupportedFeatureError,
    hookimpl,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from t2i_core import GenerationRequest
    from t2i_core.kit import ProgressCallback

CLIP_SKIP = Option(
    name="clip_skip",
    type=int,
    default=None,
    minimum=0,
    help="text-encoder layers to skip at its end, as diffusers' clip_skip: 1 = the penultimate layer "
    "(A1111's 'Clip skip 2'); None or 0 = the last layer. Up to the encoder's layer count (12 for SD 1.5)",
)
#: prompt weightings that encode the prompt themselves, without skipping CLIP layers
WEIGHTINGS_WITHOUT_CLIP_SKIP = ("compel", "compel-long")


class StableDiffusion15(ModelProvider):
    name = "sd15"
    aliases = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    pipeline_classes = ("StableDiffusionPipeline",)
    img2img_class = "StableDiffusionImg2ImgPipeline"
    # 512x512 is the checkpoint's native size, read from its UNet config (so tiny:sd15 stays tiny).
    defaults = FamilyDefaults(num_inference_steps=50, guidance_scale=7.5)
    description = "Stable Diffusion 1.x (512x512, 50 steps, guidance 7.5)"
    # Measured with raw diffusers on an H200 (30 steps, fp16, batch 1): regional compile 0.80 s/image
    # (eager 0.78), with CUDA graphs 0.56 s and a 5.5 s first image.
    cuda_graph_regions = True
    options = (CLIP_SKIP,)

    def detect_single_file(self, keys: Collection[str]) -> bool:
        # The original SD 1.x layout: a UNet and CLIP-L under cond_stage_model.transformer (SD 2.x has
        # OpenCLIP under cond_stage_model.model, SDXL its two encoders under conditioner.embedders).
        return any(key.startswith("model.diffusion_model.") for key in keys) and any(
            key.startswith("cond_stage_model.transformer.") for key in keys
        )

    def check(self, request: GenerationRequest) -> dict[str, Any]:
        options = super().check(request)
        if options.get("clip_skip") and request.prompt_weighting in WEIGHTINGS_WITHOUT_CLIP_SKIP:
            raise UnsupportedFeatureError(
                self.name,
                f"options['clip_skip'] together with prompt_weighting={request.prompt_weighting!r}",
                requested=f"clip_skip={options['clip_skip']}",
            )
        return options

    def check_request(self, pipeline: Any, request: GenerationRequest) -> None:
        from t2i_core.kit import clip_layers

        clip_skip = CLIP_SKIP.coerce(request.options.get("clip_skip"))
        layers = clip_layers(pipeline.text_encoder)
        if clip_skip is not None and clip_skip > layers:
            allowed = f"an integer in [0, {layers}] (this checkpoint's text encoder has {layers} layers)"
            raise InvalidRequestError("options['clip_skip']", clip_skip, allowed)

    def call_kwargs(self, request: GenerationRequest, options: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = super().call_kwargs(request, options)
        if options.get("clip_skip"):
            kwargs["clip_skip"] = options["clip_skip"]
        return kwargs

    def run(self, pipeline: Any, kwargs: dict[str, Any], progress: ProgressCallback | None = None) -> list[Image]:
        if kwargs.get("clip_skip"):
            kwargs = skipped_prompt_embeds(self.name, pipeline, kwargs)
        return super().run(pipeline, kwargs, progress)

    def build_tiny(self, folder: Path) -> None:
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel

        from t2i_core.tiny import clip_text_config, clip_tokenizer, tiny_unet_config, tiny_vae_config

        tokenizer = clip_tokenizer(folder / "_tokenizer_src")
        unet = UNet2DConditionModel(**tiny_unet_config())
        vae = AutoencoderKL(**tiny_vae_config())
        text_encoder = CLIPTextModel(clip_text_config(tokenizer))
        # The same scheduler configuration as the real stable-diffusion-v1-5 checkpoint.
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            set_alpha_to_one=False,
            skip_prk_steps=True,
            steps_offset=1,
        )
        pipeline = StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(folder)
        _remove_tree(folder / "_tokenizer_src")


def skipped_prompt_embeds(family: str, pipeline: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`kwargs` with ``prompt`` and ``clip_skip`` replaced by the ``prompt_embeds`` diffusers' ``clip_skip`` makes.

    As ``StableDiffusionPipeline.encode_prompt``: the prompt tokenized to the tokenizer's length
    (textual-inversion tokens expanded), ``hidden_states[-(clip_skip + 1)]`` through the final layer
    norm. The negative prompt stays text: diffusers encodes it from the last layer, clip_skip or not.
    """
    from diffusers.loaders import TextualInversionLoaderMixin

    from t2i_core.kit import clip_hidden_states

    if "prompt_embeds" in kwargs:
        raise UnsupportedFeatureError(family, "options['clip_skip'] with a prompt weighting that encodes the prompt")
    prompt = kwargs["prompt"]
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if isinstance(pipeline, TextualInversionLoaderMixin):
        texts = pipeline.maybe_convert_prompt(texts, pipeline.tokenizer)
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = pipeline._execution_device
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    embeds, _ = clip_hidden_states(
        text_encoder, tokens.input_ids.to(device), kwargs["clip_skip"], final_layer_norm=True, attention_mask=mask
    )
    rest = {name: value for name, value in kwargs.items() if name not in ("prompt", "clip_skip")}
    return {**rest, "prompt_embeds": embeds}


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@hookimpl
def register_providers(register: Callable[[ModelProvider], None]) -> None:
    register(StableDiffusion15())
