"""t2i model provider for Stable Diffusion 3 without its T5 text encoder (``StableDiffusion3Pipeline``).

The finished example of docs/tutorial-provider.md: an out-of-tree family whose denoiser is a
transformer (``SD3Transformer2DModel``) and whose sampler is flow matching. Only t2i_core is
imported here: torch, diffusers and transformers are imported inside the methods that need
them, so registering the plugin stays instant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from t2i_core import FamilyDefaults, InvalidRequestError, ModelNotFoundError, ModelProvider, hookimpl

if TYPE_CHECKING:
    from t2i_core import GenerationRequest

__version__ = "0.1.0"

PIPELINE_CLASS = "StableDiffusion3Pipeline"


class StableDiffusion3(ModelProvider):
    """Stable Diffusion 3 (medium), run with its two CLIP text encoders and without T5."""

    name = "sd3"
    aliases: ClassVar[Mapping[str, str]] = {"sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers"}
    pipeline_classes = (PIPELINE_CLASS,)
    # 1024x1024 is read from the checkpoint (transformer sample_size x VAE factor), so tiny:sd3 stays tiny.
    defaults = FamilyDefaults(num_inference_steps=28, guidance_scale=7.0)
    description = "Stable Diffusion 3 without its T5 encoder (1024x1024, 28 steps, guidance 7.0)"
    # SD3 samples by flow matching: none of t2i's shared schedulers (DDIM, Euler, ...) fits it.
    schedulers = ()
    named_schedulers: ClassVar[Mapping[str, tuple[str, Mapping[str, Any]]]] = {
        "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
        "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
    }
    # The T5 encoder (about 9 GB in float32) is never loaded, so a checkpoint downloaded without it loads too.
    skipped_components = ("text_encoder_3", "tokenizer_3")
    tiny_version = 1

    def load_pipeline(self, source: str, load_kwargs: Mapping[str, Any], model_index: Mapping[str, Any] | None) -> Any:
        # model_index.json says what the checkpoint is before any weights load.
        if model_index is not None and model_index.get("_class_name") != PIPELINE_CLASS:
            found = model_index.get("_class_name")
            raise ModelNotFoundError(source, f"it is a {found}, not a {PIPELINE_CLASS}; check --family / family=")
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline.from_pretrained(source, text_encoder_3=None, tokenizer_3=None, **load_kwargs)

    def check_request(self, pipeline: Any, request: GenerationRequest) -> None:
        # The transformer sees the latents in patches: each side must be whole patches of whole
        # latent pixels, and its position embedding covers at most pos_embed_max_size patches.
        cell = pipeline.vae_scale_factor * pipeline.patch_size
        patches = pipeline.transformer.config.pos_embed_max_size
        largest = patches * cell if patches else None
        for field in ("height", "width"):
            value = getattr(request, field)
            if value % cell or (largest is not None and value > largest):
                limit = f" up to {largest}" if largest is not None else ""
                allowed = f"a multiple of {cell}{limit} (VAE factor {pipeline.vae_scale_factor} x patch size {pipeline.patch_size})"
                raise InvalidRequestError(field, value, allowed)

    def build_tiny(self, folder: Path) -> None:
        import shutil

        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )
        from transformers import CLIPTextModelWithProjection

        from t2i_core.tiny import clip_text_config, clip_tokenizer

        tokenizer = clip_tokenizer(folder / "_tokenizer")
        tokenizer_2 = clip_tokenizer(folder / "_tokenizer_2", pad_token="!")  # SD3's second tokenizer pads with "!"
        text_encoder = CLIPTextModelWithProjection(clip_text_config(tokenizer, projection_dim=32))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, projection_dim=32))
        transformer = SD3Transformer2DModel(
            sample_size=8,  # latent pixels: 8 x VAE factor 8 = 64x64 images
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=96,  # > the two CLIP widths together (64): the embeddings are zero-padded, as in SD3
            caption_projection_dim=32,
            pooled_projection_dim=64,  # the two CLIP projections together
            pos_embed_max_size=16,
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8),  # four blocks: a VAE factor of 8, as in SD3
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5305,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3 medium's
        pipeline = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=None,
            tokenizer_3=None,
        )
        pipeline.save_pretrained(folder)
        shutil.rmtree(folder / "_tokenizer", ignore_errors=True)
        shutil.rmtree(folder / "_tokenizer_2", ignore_errors=True)


@hookimpl
def register_providers(register: Callable[[ModelProvider], None]) -> None:
    register(StableDiffusion3())
