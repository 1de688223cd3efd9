"""Tiny random-weight SDXL checkpoints: ``tiny:sdxl`` (base) and ``tiny:sdxl-refiner``.

Their layout follows the real ``stable-diffusion-xl-base-1.0`` / ``-refiner-1.0`` repositories
(the refiner has no first text encoder and conditions on aesthetic scores), scaled down after
diffusers' own SDXL ``get_dummy_components`` so that a few steps take well under a second on CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from t2i_core.tiny import clip_text_config, clip_tokenizer, tiny_unet_config, tiny_vae_config

#: ``tiny:`` refiner names → (cache name, recipe version); bump the version when a recipe changes
TINY_REFINERS = {"tiny:sdxl-refiner": ("sdxl-refiner", 2)}

_HIDDEN = 32  # the first text encoder's width; the base UNet attends to both, concatenated
# The second's differs, as in the real checkpoints (768 and 1280): diffusers' from_single_file
# tells the two encoders of a single file apart by their widths (t2i_core.testing.ldm, docs/single-file.md).
_HIDDEN_2 = 40
_TIME_EMBED = 8  # addition_time_embed_dim: each micro-conditioning number becomes 8 features


def build_base(folder: Path) -> None:
    """Write ``tiny:sdxl``: two text encoders and tokenizers, a UNet, a VAE and an Euler scheduler."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer(folder / "_tokenizer_src")
    tokenizer_2 = _tokenizer_2(folder)
    pipeline = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer, hidden_size=_HIDDEN)),
        text_encoder_2=_text_encoder_2(tokenizer_2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        # Six micro-conditioning numbers: original size, crop top-left, target size.
        unet=_unet(cross_attention_dim=_HIDDEN + _HIDDEN_2, time_ids=6),
        scheduler=_scheduler(),
    )
    pipeline.save_pretrained(folder)
    _remove_sources(folder)


def build_refiner(folder: Path) -> None:
    """Write ``tiny:sdxl-refiner``: like the real refiner, only the second text encoder, and aesthetic scores."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    tokenizer_2 = _tokenizer_2(folder)
    pipeline = StableDiffusionXLImg2ImgPipeline(
        vae=_vae(),
        text_encoder=None,
        text_encoder_2=_text_encoder_2(tokenizer_2),
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        # Five numbers: original size, crop top-left, aesthetic score.
        unet=_unet(cross_attention_dim=_HIDDEN_2, time_ids=5),
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipeline.save_pretrained(folder)
    _remove_sources(folder)


def _tokenizer_2(folder: Path) -> Any:
    # The real second tokenizer pads with "!" rather than the end-of-text token.
    return clip_tokenizer(folder / "_tokenizer_2_src", pad_token="!")


def _text_encoder_2(tokenizer: Any) -> Any:
    from transformers import CLIPTextModelWithProjection

    config = clip_text_config(tokenizer, hidden_size=_HIDDEN_2, projection_dim=_HIDDEN_2, hidden_act="gelu")
    return CLIPTextModelWithProjection(config)


def _unet(*, cross_attention_dim: int, time_ids: int) -> Any:
    from diffusers import UNet2DConditionModel

    config = tiny_unet_config(
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        # The time ids' features plus the pooled output of the second text encoder.
        projection_class_embeddings_input_dim=time_ids * _TIME_EMBED + _HIDDEN_2,
        cross_attention_dim=cross_attention_dim,
    )
    return UNet2DConditionModel(**config)


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**tiny_vae_config(scaling_factor=0.13025))  # the SDXL VAE's scaling factor


def _scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    # The scheduler configuration of the real SDXL base and refiner checkpoints.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        interpolation_type="linear",
        steps_offset=1,
        timestep_spacing="leading",
        use_karras_sigmas=False,
    )


def _remove_sources(folder: Path) -> None:
    for source in ("_tokenizer_src", "_tokenizer_2_src"):
        shutil.rmtree(folder / source, ignore_errors=True)
