"""``tiny:kandinsky22``: a small random-weight Kandinsky 2.2 combined checkpoint (prior + decoder).

Its layout and schedulers follow the real ``kandinsky-2-2-prior`` and ``kandinsky-2-2-decoder``
repositories, its models are scaled down after diffusers' own Kandinsky 2.2 dummy components, so
that a 64x64 image takes a fraction of a second on a CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

NAME = "kandinsky22"
#: bump when the recipe changes, so that cached copies are rebuilt
VERSION = 1

_EMBEDDING = 32  # the CLIP width: text and image embeddings, the prior's output, the UNet's image input
_CLIP_IMAGE = 28  # the zero image the prior encodes for "no negative prompt" is this size: keep it small


def build(folder: Path) -> None:
    """Write the combined checkpoint into `folder`: the prior's five parts, a UNet, a MoVQ, two schedulers."""
    from diffusers import KandinskyV22CombinedPipeline

    from t2i_core.tiny import clip_tokenizer  # the configs and tokenizers load for a build, not at registration

    tokenizer = clip_tokenizer(folder / "_tokenizer_src")
    pipeline = KandinskyV22CombinedPipeline(
        unet=_unet(),
        scheduler=_decoder_scheduler(),
        movq=_movq(),
        prior_prior=_prior(tokenizer.model_max_length),
        prior_image_encoder=_image_encoder(),
        prior_text_encoder=_text_encoder(tokenizer),
        prior_tokenizer=tokenizer,
        prior_scheduler=_prior_scheduler(),
        prior_image_processor=_image_processor(),
    )
    pipeline.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer_src", ignore_errors=True)


def _prior(text_length: int) -> Any:
    import torch
    from diffusers import PriorTransformer

    prior = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=12,
        embedding_dim=_EMBEDDING,
        num_layers=1,
        num_embeddings=text_length,
    )
    # The CLIP statistics start as zeros, which would turn every image embedding into zeros.
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    return prior


def _text_encoder(tokenizer: Any) -> Any:
    from transformers import CLIPTextModelWithProjection

    from t2i_core.tiny import clip_text_config

    return CLIPTextModelWithProjection(clip_text_config(tokenizer, hidden_size=_EMBEDDING, projection_dim=_EMBEDDING))


def _image_encoder() -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=_EMBEDDING,
        projection_dim=_EMBEDDING,
        image_size=_CLIP_IMAGE,
        patch_size=14,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        num_channels=3,
    )
    return CLIPVisionModelWithProjection(config)


def _image_processor() -> Any:
    try:  # without torchvision, transformers falls back to the PIL processor anyway (with a warning)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    return Processor(
        size=_CLIP_IMAGE,
        crop_size=_CLIP_IMAGE,
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
    )


def _prior_scheduler() -> Any:
    from diffusers import UnCLIPScheduler

    # The configuration of the real kandinsky-2-2-prior.
    return UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )


def _unet() -> Any:
    from diffusers import UNet2DConditionModel

    from t2i_core.tiny import tiny_unet_config

    # The shared tiny UNet's sizes (32 latent cells, times the MoVQ's factor of 2: a 64x64 native
    # size) with the real decoder's block kinds and image conditioning.
    config = tiny_unet_config(
        in_channels=4,
        out_channels=8,  # mean and variance, as in the real decoder
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        encoder_hid_dim=_EMBEDDING,
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    return UNet2DConditionModel(**config)


def _movq() -> Any:
    from diffusers import VQModel

    return VQModel(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )


def _decoder_scheduler() -> Any:
    from diffusers import DDPMScheduler

    # The configuration of the real kandinsky-2-2-decoder.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="epsilon",
        sample_max_value=1.0,
        steps_offset=1,
        thresholding=False,
        timestep_spacing="leading",
        variance_type="fixed_small",
    )
